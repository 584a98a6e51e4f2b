"""The model's Prometheus metrics, published through the python backend's `pb_utils.MetricFamily`.

They appear on Triton's metrics endpoint (`/metrics`) labelled `model="bunny"` and `instance` (the Triton
instance, e.g. `bunny_0_1`): each instance is its own engine in its own stub process, with its own series.
Counters follow the engine's
running totals (EngineStats) by increments; gauges are set from the latest stats. Every increment, set or
observation is a round trip to the server process, so nothing is published per token: time to first token and
inter-token latency are counted here, exactly, and published with the stats as Prometheus histogram series
(`_bucket{le}`, `_sum`, `_count`) through counter families, the changed series only, since the python backend
has no way to add many observations in one call. The families and metrics are held here for the model's
lifetime: Triton drops a metric whose family has been garbage-collected.
"""
from __future__ import annotations

from bisect import bisect_left

from bunny_backend.engine.outputs import EngineStats

FINISH_REASONS = ("stop", "length", "cancelled", "error")
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

_COUNTERS = {   # metric name -> (description, EngineStats attribute)
    "bunny_prompt_tokens_total": ("Prompt tokens processed (image features counted)", "prompt_tokens_total"),
    "bunny_generation_tokens_total": ("Tokens generated", "generation_tokens_total"),
    "bunny_preemptions_total": ("Sequences preempted for lack of KV blocks", "num_preemptions"),
    "bunny_prefix_cache_hit_tokens_total": ("Prompt tokens served from the prefix cache", "prefix_cache_hit_tokens"),
    "bunny_prefix_cache_query_tokens_total": ("Prompt tokens looked up in the prefix cache", "prefix_cache_query_tokens"),
    "bunny_encoder_images_total": ("Images run through the vision tower", "encoder_images_total"),
    "bunny_encoder_seconds_total": ("Time spent in the vision tower", "encoder_seconds_total"),
    "bunny_encoder_cache_hits_total": ("Images whose features came from the encoder cache", "encoder_cache_hits"),
    "bunny_encoder_cache_misses_total": ("Images not found in the encoder cache", "encoder_cache_misses"),
}
_GAUGES = {
    "bunny_num_requests_running": ("Sequences in the running batch", "num_running"),
    "bunny_num_requests_waiting": ("Sequences waiting to be scheduled", "num_waiting"),
    "bunny_kv_blocks_used": ("KV cache blocks in use", "kv_blocks_used"),
    "bunny_kv_blocks_total": ("KV cache blocks allocated", "kv_blocks_total"),
    "bunny_encoder_cache_bytes": ("Bytes of image features held by the encoder cache", "encoder_cache_bytes"),
}


class _Histogram:
    """Observations counted into cumulative buckets here; publish() adds what changed since the last one."""

    def __init__(self, family, name: str, description: str, labels: dict, buckets: list[float]):
        self.bounds = [*buckets, float("inf")]
        bucket = family(f"{name}_bucket", f"{description} (cumulative count per upper bound le)")
        self._series = [bucket.Metric(labels={**labels, "le": _le(b)}) for b in self.bounds]
        self._sum = family(f"{name}_sum", f"{description}: sum of the observations").Metric(labels=labels)
        self._count = family(f"{name}_count", f"{description}: number of observations").Metric(labels=labels)
        self._counts = [0] * len(self.bounds)     # per bucket, not cumulative
        self._total = 0.0
        self._published = [0] * len(self.bounds)  # cumulative, as published
        self._published_total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._total += value

    def publish(self) -> None:
        count_before, cumulative = self._published[-1], 0
        for i, metric in enumerate(self._series):
            cumulative += self._counts[i]
            if cumulative > self._published[i]:
                metric.increment(cumulative - self._published[i])
                self._published[i] = cumulative
        if cumulative > count_before:
            self._count.increment(cumulative - count_before)
            self._sum.increment(self._total - self._published_total)
            self._published_total = self._total


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class BunnyMetrics:
    def __init__(self, pb_utils, model_name: str = "bunny", instance: str = ""):
        MF = pb_utils.MetricFamily
        labels = {"model": model_name, "instance": instance or model_name}
        self._families = []   # keep every family alive as long as its metrics

        def family(name, description, kind=MF.COUNTER):
            fam = MF(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        requests = family("bunny_requests_total", "Requests finished, by finish reason")
        self.requests = {r: requests.Metric(labels={**labels, "finish_reason": r}) for r in FINISH_REASONS}
        self.counters = {attr: family(name, desc).Metric(labels=labels)
                         for name, (desc, attr) in _COUNTERS.items()}
        self.gauges = {attr: family(name, desc, MF.GAUGE).Metric(labels=labels)
                       for name, (desc, attr) in _GAUGES.items()}
        self.ttft = _Histogram(family, "bunny_time_to_first_token_seconds", "Time from arrival to the first token",
                               labels, TTFT_BUCKETS)
        self.itl = _Histogram(family, "bunny_inter_token_latency_seconds",
                              "Time between consecutive tokens of a request", labels, ITL_BUCKETS)
        self._last = {attr: 0 for attr in self.counters}
        self._gauge_values: dict[str, float] = {}
        self._finished: dict[str, int] = {}

    def observe(self, ttfts: list[float], itls: list[float]) -> None:
        """Count latencies here; publish() sends them."""
        for value in ttfts:
            self.ttft.observe(value)
        for value in itls:
            self.itl.observe(value)

    def on_finished(self, finish_reason: str, count: int = 1) -> None:
        reason = finish_reason if finish_reason in self.requests else "error"
        self._finished[reason] = self._finished.get(reason, 0) + count

    def publish(self, stats: EngineStats | None = None) -> None:
        """Everything counted since the last call, and the stats' counters and gauges when given."""
        for reason, count in self._finished.items():
            self.requests[reason].increment(count)
        self._finished = {}
        self.ttft.publish()
        self.itl.publish()
        if stats is not None:
            self.on_stats(stats)

    def on_stats(self, stats: EngineStats) -> None:
        for attr, metric in self.counters.items():
            value = getattr(stats, attr)
            if value > self._last[attr]:
                metric.increment(value - self._last[attr])
                self._last[attr] = value
        for attr, metric in self.gauges.items():   # each set is a round trip to the server: only on a change
            value = getattr(stats, attr)
            if value != self._gauge_values.get(attr):
                metric.set(value)
                self._gauge_values[attr] = value

    def close(self) -> None:
        """Drop the metrics before their families (the python backend's required order)."""
        self.requests = self.counters = self.gauges = {}
        self.ttft = self.itl = None
        self._families.clear()
