"""Scenario *stall* (engine in-process): six streams are decoding when one long prompt arrives. How long do the
running streams wait between tokens while it prefills, and how long does the newcomer wait for its first token?

Each round: ten steady decode steps, then a prompt of LONG_PROMPT_TOKENS tokens (corpus text, no chat template, a
different one each round) arrives; the engine steps until its first token. Gaps counted: every inter-token gap of
the streams that ends after the arrival and starts before the long prompt's first token.

Run as a worker: `python -m bench.stall MODEL_PATH OPTIONS_JSON` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import bunny_backend
from bench.common import emit
from bench.token_clock import TokenClock, long_prompt, make_engine, percentile
from bunny_backend.engine.sampling_params import SamplingParams

NUM_STREAMS = 6
LONG_PROMPT_TOKENS = 1500
STEADY_STEPS = 10


def benchmark(model_path: str, opts: dict, log=print) -> dict:
    rounds = opts.get("rounds", 3)
    engine, ignored = make_engine(model_path, enable_prefix_caching=False, max_num_seqs=16,
                                  kv_cache_memory_bytes=opts["kv_cache_bytes"], **opts.get("knobs", {}))
    clock = TokenClock(engine)
    stream_params = SamplingParams(max_tokens=2000, ignore_eos=True)
    streams = [f"stream{i}" for i in range(NUM_STREAMS)]
    for i, rid in enumerate(streams):
        clock.add(rid, f"Stream {i}: tell me a long story about the sea.", [], stream_params)
    while not all(clock.times[rid] for rid in streams):
        clock.step()
    per_round = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for _ in range(STEADY_STEPS):
            clock.step()
        steady = [g for rid in streams for g in clock.gaps(rid, after=t0)]
        rid = f"long{r}"
        text = long_prompt(engine.tokenizer, LONG_PROMPT_TOKENS, offset=997 * r)
        clock.add(rid, text, [], SamplingParams(max_tokens=1), apply_chat_template=False)
        arrived = clock.sent[rid]
        latency = clock.run_until_first_token(rid)
        clock.step()   # the streams' next token after it (the gap across a whole-prompt prefill ends here)
        gaps = [g for s in streams for g in clock.gaps(s, after=arrived, before=arrived + latency)]
        per_round.append({"long_prompt_latency_s": latency, "gap_median_s": statistics.median(gaps),
                          "gap_p99_s": percentile(gaps, 99), "gap_max_s": max(gaps),
                          "gap_max_over_latency": max(gaps) / latency,
                          "steady_itl_median_s": statistics.median(steady), "num_gaps": len(gaps)})
        log(f"stall round {r}: long prompt {1000 * latency:.0f} ms; stream gaps median "
            f"{1000 * per_round[-1]['gap_median_s']:.0f} ms, max {1000 * max(gaps):.0f} ms "
            f"(steady {1000 * per_round[-1]['steady_itl_median_s']:.0f} ms)")
    summary = {key: statistics.median(r[key] for r in per_round) for key in per_round[0]}   # typical round
    for key in ("gap_max_s", "gap_max_over_latency"):   # the worst round
        summary[key] = max(r[key] for r in per_round)
    return {"scenario": "stall", "engine_direct": True, "num_streams": NUM_STREAMS,
            "long_prompt_tokens": LONG_PROMPT_TOKENS, "rounds": per_round, **summary,
            "bunny_backend": bunny_backend.__file__, "ignored_knobs": ignored}


def main(argv: list[str]) -> None:
    emit(benchmark(argv[0], json.loads(argv[1]), log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
