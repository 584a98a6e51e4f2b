"""What the load scenarios share: an engine built from whatever knobs its code version knows, a clock on every
token as a caller of `step()` sees it, distinct synthetic images, and percentiles.

The scenarios also run against an older `bunny_backend` (run.py --baseline), so they use only what every version
has: EngineConfig's fields by name, add_request / step / has_unfinished, and the outputs' token ids.
"""
from __future__ import annotations

import dataclasses
import io
import time
from collections import defaultdict

import numpy as np

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine

def make_engine(model_path: str, **knobs) -> tuple[LLMEngine, list[str]]:
    """The engine with the knobs its EngineConfig has; returns it and the knobs this version does not know."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = LLMEngine(EngineConfig(model_path=model_path, **{k: v for k, v in knobs.items() if k in known}))
    return engine, sorted(set(knobs) - known)


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def distinct_image(index: int, size: int = 384) -> bytes:
    """A PNG unlike every other index's (so neither cache can serve one image for another)."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([(x * 255 // size + 37 * index) % 256, (y * 255 // size + 91 * index) % 256,
                    ((x + y) * 127 // size + 13 * index) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def long_prompt(tokenizer, num_tokens: int, offset: int = 0) -> str:
    """Corpus text of about num_tokens tokens (no chat template), starting `offset` words in."""
    from bunny_backend.tools.demo_checkpoint import CORPUS
    words = CORPUS.read_text().split()
    out: list[str] = []
    i = offset
    while len(tokenizer.encode(" ".join(out), add_special_tokens=False)) < num_tokens:
        out += [words[(i + j) % len(words)] for j in range(32)]
        i += 32
    while len(tokenizer.encode(" ".join(out), add_special_tokens=False)) > num_tokens:
        out.pop()
    return " ".join(out)


class TokenClock:
    """Drives an engine and timestamps each token when step() hands it over (time.perf_counter())."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.sent: dict[str, float] = {}
        self.times: dict[str, list[float]] = defaultdict(list)
        self.finished: set[str] = set()

    def add(self, request_id: str, text: str, images: list[bytes], params, sent: float | None = None,
            apply_chat_template: bool = True) -> None:
        self.sent[request_id] = time.perf_counter() if sent is None else sent
        self.engine.add_request(request_id, text, images, params, apply_chat_template=apply_chat_template)

    def step(self) -> None:
        outs = self.engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.error:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            self.times[out.request_id] += [now] * len(out.delta_token_ids)
            if out.finished:
                self.finished.add(out.request_id)

    def run_until_first_token(self, request_id: str) -> float:
        """Steps until request_id has a token; returns its time to first token."""
        while not self.times[request_id]:
            self.step()
        return self.ttft(request_id)

    def ttft(self, request_id: str) -> float:
        return self.times[request_id][0] - self.sent[request_id]

    def gaps(self, request_id: str, after: float = float("-inf"), before: float = float("inf")) -> list[float]:
        """Inter-token gaps of request_id that end after `after` and start before `before`."""
        t = self.times[request_id]
        return [b - a for a, b in zip(t, t[1:]) if b > after and a < before]
