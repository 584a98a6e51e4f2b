"""What the engine thread hands the responder thread: each request's output not yet sent, merged.

The engine thread merges every step's outputs into one pending entry per request (text and ids appended, counters
replaced, a finish or an error sticks) and the responder takes what is due, one response per request. When the
responder keeps up, each response carries one token; when it lags (every send is a round trip to the server
process, ~0.3 ms), the tokens made meanwhile travel together in the next one, so a step's worth of streams costs
one send per stream however far behind the responder is, and memory is bounded by the requests in flight.

Due: a request's final output at once; a stream's first token at once, then every `stream_interval` tokens; a
non-streaming request only when it finishes. The latest engine stats and the latency observations (time to first
token, inter-token gaps) travel the same way, for the metrics.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from bunny_backend.engine.outputs import EngineStats, RequestOutput, TokenLogprobs


@dataclass(slots=True)
class Ready:
    """One response's worth of a request's output."""
    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    final: bool
    finish_reason: str | None    # set when final: stop, length, cancelled or error
    error: str | None
    handed: float                # when the engine thread last merged into it
    logprobs: list[TokenLogprobs] | None = None   # one per token_ids when the request asked for logprobs


@dataclass(slots=True)
class _Pending:
    stream: bool
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    sent_first: bool = False
    handed: float = 0.0


@dataclass(slots=True)
class Taken:
    ready: list[Ready]
    stats: EngineStats | None              # the latest snapshot, if a new one came
    ttfts: list[float]
    itls: list[float]


class Handover:
    def __init__(self, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.stream_interval = stream_interval
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._dirty: dict[str, None] = {}        # requests merged into since the responder last looked, in order
        self._stats: EngineStats | None = None
        self._ttfts: list[float] = []
        self._itls: list[float] = []
        self._stopping = False

    def open(self, request_id: str, stream: bool) -> None:
        with self._cond:
            self._pending[request_id] = _Pending(stream)

    def discard(self, request_id: str) -> None:
        with self._cond:
            self._pending.pop(request_id, None)
            self._dirty.pop(request_id, None)

    def merge(self, outputs: list[RequestOutput], t: float, stats: EngineStats | None = None) -> None:
        """The engine thread's side: outputs of one step (or failures), and optionally a stats snapshot, which
        the responder publishes before it sends the responses taken with it."""
        with self._cond:
            if stats is not None:
                self._stats = stats
            for out in outputs:
                p = self._pending.get(out.request_id)
                if p is None:   # a request never opened (or ended): only a final output is worth handing on
                    if not out.finished:
                        continue
                    p = self._pending[out.request_id] = _Pending(stream=False)
                if p.finished:
                    continue
                p.text.append(out.delta_text)
                p.ids.extend(out.delta_token_ids)
                if out.logprobs is not None:
                    p.logprobs = p.logprobs if p.logprobs is not None else []
                    p.logprobs.extend(out.logprobs)
                p.prompt_tokens, p.completion_tokens = out.prompt_tokens, out.completion_tokens
                if out.finished:
                    p.finished, p.finish_reason, p.error = True, out.finish_reason, out.error
                p.handed = t
                if out.ttft_s is not None:
                    self._ttfts.append(out.ttft_s)
                self._itls.extend(out.inter_token_latencies_s)
                self._dirty[out.request_id] = None
            self._cond.notify()

    def take(self, timeout: float) -> Taken:
        """The responder's side: waits up to `timeout` for something to do; returns what is due."""
        with self._cond:
            if not (self._dirty or self._stats or self._stopping):
                self._cond.wait(timeout)
            ready = []
            for rid in self._dirty:
                p = self._pending[rid]
                due = p.finished or (p.stream and p.ids and (not p.sent_first or len(p.ids) >= self.stream_interval))
                if not due:
                    continue   # looked at again when more is merged into it
                ready.append(Ready(rid, "".join(p.text), p.ids, p.prompt_tokens, p.completion_tokens, p.finished,
                                   p.finish_reason if p.finished else None, p.error, p.handed, p.logprobs))
                if p.finished:
                    del self._pending[rid]
                else:
                    p.text, p.ids, p.logprobs, p.sent_first = [], [], None, True
            self._dirty = {}
            taken = Taken(ready, self._stats, self._ttfts, self._itls)
            self._stats, self._ttfts, self._itls = None, [], []
            return taken

    def stop(self) -> None:
        """Wake the responder for good; it ends once it has taken everything."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def idle(self) -> bool:
        with self._cond:
            return not self._dirty and self._stats is None
