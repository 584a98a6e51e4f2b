"""The transformers baseline: Qwen2ForCausalLM.generate over a static, left-padded batch of `inputs_embeds`.

The embeddings come from the reference (`ReferenceBunny.embed`: SigLIP + projector + token embeddings, the same
checkpoint, dtype and prompt as the engine), SDPA attention, greedy, min_new_tokens = max_new_tokens = M. The clock
starts before the image is decoded, as the engine's does. Per-step times come from a streamer.

Run as a worker: `python -m bench.hf_generate MODEL_PATH WORKLOAD_JSON DTYPE` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import sys
import time

import torch

from bench.common import RequestTiming, Workload, emit, peak_rss_bytes, summarize
from bunny_backend.io.prompt import build_prompt, tokenize_prompt
from bunny_backend.io.tokenizer import eos_token_ids, load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny


class StepClock:
    """A generate() streamer that keeps the time of every put after the first (the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


class HFBaseline:
    def __init__(self, model_path: str, dtype: torch.dtype, device: str):
        self.ref = ReferenceBunny.from_pretrained(model_path, dtype=dtype, device=device)
        self.ref.lm.set_attn_implementation("sdpa")
        self.tok = load_tokenizer(model_path)
        self.eos = list(eos_token_ids(model_path, self.tok))

    def embeds(self, prompts: list[str], images: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded inputs_embeds [N, L, hidden] and attention_mask [N, L]."""
        rows = []
        for text, image in zip(prompts, images):
            ids = tokenize_prompt(self.tok, build_prompt(text, 1), num_images=1)
            rows.append(self.ref.embed(ids, self.ref.pixel_values([image]))[0])
        width = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        emb = rows[0].new_zeros(len(rows), width, hidden)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=emb.device)
        for i, r in enumerate(rows):
            emb[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        return emb, mask

    @torch.inference_mode()
    def generate(self, prompts: list[str], images: list[bytes], max_tokens: int):
        """(wall seconds, per-request timings, generated ids [N, M])."""
        clock = StepClock()
        t0 = time.perf_counter()
        emb, mask = self.embeds(prompts, images)
        out = self.ref.lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_tokens,
                                   min_new_tokens=max_tokens, do_sample=False, pad_token_id=self.eos[0],
                                   eos_token_id=self.eos, streamer=clock, top_k=None, top_p=None, temperature=None)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        new = out[:, -max_tokens:]
        if new.shape[1] != max_tokens:
            raise RuntimeError(f"generate returned {new.shape[1]} new tokens, expected {max_tokens}")
        first, last = (clock.times[0], clock.times[-1]) if clock.times else (None, None)
        timings = [RequestTiming(sent=t0, first=first, last=last, tokens=max_tokens) for _ in prompts]
        return wall, timings, new


def benchmark(model_path: str, work: Workload, dtype: str, log=print) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = HFBaseline(model_path, getattr(torch, dtype), device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(work.warmup):
        hf.generate([work.prompt], [work.image], 8)
    ttfts = sorted(t.ttft for _ in range(3) for t in hf.generate([work.prompt], [work.image], 1)[1])
    rows, first_ids = [], None
    for n in work.batch_sizes:
        rounds = []
        for _ in range(work.rounds):
            wall, timings, new = hf.generate([work.prompt] * n, [work.image] * n, work.max_tokens)
            rounds.append((wall, timings))
            first_ids = first_ids or new[0].tolist()
        rows.append(summarize(n, rounds).as_dict())
        r = rows[-1]
        log(f"hf      batch {n:2d}: {r['output_tokens_per_s']:7.1f} tok/s  TTFT {r['ttft_mean_ms']:7.0f} ms  "
            f"ITL {r['itl_mean_ms']:6.1f} ms")
    out = {"system": "transformers", "rows": rows, "ttft_1image_s": ttfts[0], "ttft_1image_median_s": ttfts[1],
           "peak_rss_bytes": peak_rss_bytes(), "first_request_ids": first_ids, "device": device, "dtype": dtype,
           "attn_implementation": "sdpa", "threads": torch.get_num_threads()}
    if device == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv: list[str]) -> None:
    model_path, work_json, dtype = argv[0], argv[1], argv[2]
    work = Workload.from_json(work_json)
    if work.threads:
        torch.set_num_threads(work.threads)
    emit(benchmark(model_path, work, dtype, log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
