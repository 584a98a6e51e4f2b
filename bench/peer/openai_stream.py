"""A streaming client for an OpenAI-compatible chat server (vLLM's), timed like `bunny-client perf`.

Standard library only (http.client, one connection per concurrent request), so it runs in our .venv.
vLLM's `return_token_ids` extension puts each chunk's token ids in the stream: the tokens are counted, and the
greedy ids compared with ours, from those.
"""
from __future__ import annotations

import base64
import http.client
import functools
import json
import time

from bunny_client.perf import all_at_once
from bunny_client.perf_stats import RequestTiming

MODEL_NAME = "bunny"


def chat_body(text: str, image: bytes | None, max_tokens: int) -> bytes:
    if image is None:
        content: object = text
    else:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                       "return_token_ids": True}).encode()


class ChatConnection:
    def __init__(self, host: str, port: int, timeout_s: float = 600.0):
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.conn.connect()

    def stream(self, body: bytes) -> tuple[RequestTiming, list[int]]:
        """POST one streaming chat request; the timing of its token-carrying chunks and all its token ids."""
        timing = RequestTiming(sent=time.perf_counter())
        self.conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        ids: list[int] = []
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                resp.read()                       # the chunked terminator: keeps the connection reusable
                break
            chunk = json.loads(payload)
            new = [t for c in chunk.get("choices", []) for t in (c.get("token_ids") or [])]
            timing.record(time.perf_counter(), len(new))
            ids += new
        return timing, ids

    def close(self) -> None:
        self.conn.close()


def run_round(conns: list[ChatConnection], bodies: list[bytes]):
    """One request per connection, all at once: (wall seconds, timings, ids of each request, errors)."""
    wall, out = all_at_once([functools.partial(conn.stream, body) for conn, body in zip(conns, bodies)])
    done = [r for r in out if isinstance(r, tuple)]
    return wall, [t for t, _ in done], [ids for _, ids in done], [str(r) for r in out if not isinstance(r, tuple)]
