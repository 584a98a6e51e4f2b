"""Benchmark arithmetic: batch-size ranges, per-request timings, and the per-batch-size summary."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def parse_batch_sizes(spec: str) -> list[int]:
    """'1-10' -> [1..10]; '1,2,4,8' and '1-3,8' work too. Sorted, unique, all >= 1."""
    sizes: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad batch sizes {spec!r}: use e.g. 1-10 or 1,2,4,8") from None
        if a < 1 or b < a:
            raise ValueError(f"bad batch size range {part!r} in {spec!r}")
        sizes.update(range(a, b + 1))
    if not sizes:
        raise ValueError(f"no batch sizes in {spec!r}")
    return sorted(sizes)


@dataclass(slots=True)
class RequestTiming:
    """perf_counter times of one request: sent, first and last response carrying tokens; tokens received. A
    response may carry several tokens (a server that merges a stream's tokens while its sender lags)."""

    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    first_tokens: int = 1      # tokens the first response carried
    responses: int = 0         # responses carrying tokens

    def record(self, t: float, new_tokens: int) -> None:
        """A response that arrived at t carrying new_tokens tokens (none: it is not counted)."""
        if new_tokens <= 0:
            return
        if self.first is None:
            self.first, self.first_tokens = t, new_tokens
        self.last = t
        self.tokens += new_tokens
        self.responses += 1

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def itl(self) -> float | None:
        """Mean time between tokens after those of the first response, per token."""
        if self.first is None or self.last is None or self.tokens <= self.first_tokens:
            return None
        return (self.last - self.first) / (self.tokens - self.first_tokens)


@dataclass(slots=True)
class BatchStats:
    batch_size: int
    rounds: int
    requests: int
    failed: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    tokens_per_request: float
    ttft_mean_ms: float
    ttft_p90_ms: float
    itl_mean_ms: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summarize(batch_size: int, rounds: list[tuple[float, list[RequestTiming]]], failed: int = 0) -> BatchStats:
    """Rounds of (wall seconds, timings of the requests that completed) -> one row of the report.

    Throughputs are totals over total wall time; latencies are over all requests of all rounds.
    """
    wall = sum(w for w, _ in rounds)
    timings = [t for _, ts in rounds for t in ts]
    tokens = sum(t.tokens for t in timings)
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    itls = [t.itl for t in timings if t.itl is not None]
    return BatchStats(
        batch_size=batch_size,
        rounds=len(rounds),
        requests=len(timings),
        failed=failed,
        wall_s=wall,
        requests_per_s=len(timings) / wall if wall > 0 else 0.0,
        output_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        tokens_per_request=tokens / len(timings) if timings else 0.0,
        ttft_mean_ms=1000 * float(np.mean(ttfts)) if ttfts else float("nan"),
        ttft_p90_ms=1000 * percentile(ttfts, 90),
        itl_mean_ms=1000 * float(np.mean(itls)) if itls else float("nan"),
    )
