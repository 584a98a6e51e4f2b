"""Scenario *arrivals* (engine in-process): image requests arrive at random (a Poisson process) for a while; what do
time to first token and the time between tokens look like while newcomers keep prefilling beside running streams?

Each request is the perf client's prompt with its own synthetic image (so neither cache serves one request from
another), greedy, `ignore_eos`, MAX_TOKENS new tokens; the prefix cache is on (the server's default; it shares the
system prompt). Arrival times are drawn from a seeded generator, the same for every code version compared. TTFT
counts from the scheduled arrival, so time spent waiting for the step in flight counts.

Run as a worker: `python -m bench.arrivals MODEL_PATH OPTIONS_JSON` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import json
import random
import sys
import time

import bunny_backend
from bench.common import Workload, emit
from bench.token_clock import TokenClock, distinct_image, make_engine, percentile
from bunny_backend.engine.sampling_params import SamplingParams

MAX_TOKENS = 64


def arrival_times(rate_per_s: float, duration_s: float, seed: int = 0) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return times
        times.append(t)


def benchmark(model_path: str, opts: dict, log=print) -> dict:
    rate, duration = opts.get("rate_per_s", 1.0), opts.get("duration_s", 60.0)
    engine, ignored = make_engine(model_path, enable_prefix_caching=True, max_num_seqs=16,
                                  kv_cache_memory_bytes=opts["kv_cache_bytes"], **opts.get("knobs", {}))
    clock = TokenClock(engine)
    prompt, params = Workload([1], MAX_TOKENS).prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    warm = "warm"
    clock.add(warm, prompt, [distinct_image(10_000)], params)
    while warm not in clock.finished:
        clock.step()
    times = arrival_times(rate, duration, opts.get("seed", 0))
    images = [distinct_image(i) for i in range(len(times))]
    pending = list(enumerate(times))
    max_running = 0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][1] <= now:
            i, at = pending.pop(0)
            clock.add(f"r{i}", prompt, [images[i]], params, sent=t0 + at)
        if engine.has_unfinished():
            clock.step()
            max_running = max(max_running, engine.scheduler.num_running)
        else:
            time.sleep(min(pending[0][1] - now, 0.01))
    wall = time.perf_counter() - t0
    rids = [f"r{i}" for i in range(len(times))]
    ttfts = [clock.ttft(rid) for rid in rids]
    itls = [g for rid in rids for g in clock.gaps(rid)]
    result = {"scenario": "arrivals", "engine_direct": True, "rate_per_s": rate, "duration_s": duration,
              "requests": len(rids), "max_tokens": MAX_TOKENS, "wall_s": wall, "max_running": max_running,
              "output_tokens_per_s": sum(len(clock.times[r]) for r in rids) / wall,
              "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
              "itl_p50_s": percentile(itls, 50), "itl_p99_s": percentile(itls, 99), "itl_max_s": max(itls),
              "bunny_backend": bunny_backend.__file__, "ignored_knobs": ignored}
    result["itl_p99_over_p50"] = result["itl_p99_s"] / result["itl_p50_s"]
    log(f"arrivals: {len(rids)} requests at {rate}/s over {duration:.0f} s (all done in {wall:.0f} s, at most "
        f"{max_running} running): TTFT p50 {1000 * result['ttft_p50_s']:.0f} ms, p99 {1000 * result['ttft_p99_s']:.0f} "
        f"ms; ITL p50 {1000 * result['itl_p50_s']:.0f} ms, p99 {1000 * result['itl_p99_s']:.0f} ms")
    return result


def main(argv: list[str]) -> None:
    emit(benchmark(argv[0], json.loads(argv[1]), log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
