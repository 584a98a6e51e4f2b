"""The model's Prometheus metrics, published through the python backend's `pb_utils.MetricFamily`.

They appear on Triton's metrics endpoint (`/metrics`) labelled `model="bunny"` and `instance` (the Triton
instance, e.g. `bunny_0_1`): each instance is its own engine in its own stub process, with its own series.
Counters follow the engine's
running totals (EngineStats) by increments; gauges are set from the latest stats; TTFT and inter-token latency
are histograms. The families and metrics are held here for the model's lifetime: Triton drops a metric whose
family has been garbage-collected.
"""
from __future__ import annotations

from bunny_backend.engine.outputs import EngineStats, RequestOutput

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


class BunnyMetrics:
    def __init__(self, pb_utils, model_name: str = "bunny", instance: str = ""):
        MF = pb_utils.MetricFamily
        labels = {"model": model_name, "instance": instance or model_name}
        self._families = []   # keep every family alive as long as its metrics

        def family(name, description, kind):
            fam = MF(name=name, description=description, kind=kind)
            self._families.append(fam)
            return fam

        requests = family("bunny_requests_total", "Requests finished, by finish reason", MF.COUNTER)
        self.requests = {r: requests.Metric(labels={**labels, "finish_reason": r}) for r in FINISH_REASONS}
        self.counters = {attr: family(name, desc, MF.COUNTER).Metric(labels=labels)
                         for name, (desc, attr) in _COUNTERS.items()}
        self.gauges = {attr: family(name, desc, MF.GAUGE).Metric(labels=labels)
                       for name, (desc, attr) in _GAUGES.items()}
        self.ttft = family("bunny_time_to_first_token_seconds", "Time from arrival to the first token",
                           MF.HISTOGRAM).Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = family("bunny_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                          MF.HISTOGRAM).Metric(labels=labels, buckets=ITL_BUCKETS)
        self._last = {attr: 0 for attr in self.counters}
        self._gauge_values: dict[str, float] = {}

    def on_output(self, out: RequestOutput) -> None:
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
        for dt in out.inter_token_latencies_s:
            self.itl.observe(dt)

    def on_finished(self, finish_reason: str, count: int = 1) -> None:
        metric = self.requests.get(finish_reason) or self.requests["error"]
        metric.increment(count)

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
