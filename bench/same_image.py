"""Scenario *same image twice* (engine in-process): a second request about a picture the engine has just seen.
How much faster is its first token with the encoder (image-feature) cache than without it?

Per round, a fresh image: a first request ("Describe the image."), then two second requests, one at a time:
- *second question*: the same chat prefix and image, another question. The prefix cache serves the image's rows
  up to its last KV block, which also holds the new question's first tokens, so that block is recomputed and
  needs the image's last feature rows: without the encoder cache the vision tower runs again.
- *other text first*: text before the image differs, so the prefix cache serves nothing past the system prompt.
Each request runs alone with max_tokens 1; TTFT counts from add_request (image decoding included). Two engines,
encoder cache on (its default size) and off (0 bytes), the prefix cache on in both; medians over the rounds.

Run as a worker: `python -m bench.same_image MODEL_PATH OPTIONS_JSON` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import json
import statistics
import sys

import bunny_backend
from bench.common import emit
from bench.token_clock import TokenClock, distinct_image, make_engine
from bunny_backend.engine.sampling_params import SamplingParams

SECOND_REQUESTS = {"second_question": "What colours does it have?",
                   "other_text_first": "Here is a photo from my trip to the coast. <image>\nWhat colours does it have?"}


def benchmark(model_path: str, opts: dict, log=print) -> dict:
    """Two engines in this process, the encoder cache on (its default size) and off, each round on both in
    alternating order, so that load from elsewhere falls on both."""
    engines = {}
    for label, knobs in (("cache_on", {}), ("cache_off", {"encoder_cache_bytes": 0})):
        engine, ignored = make_engine(model_path, enable_prefix_caching=True,
                                      kv_cache_memory_bytes=opts["kv_cache_bytes"], **opts.get("knobs", {}), **knobs)
        engines[label] = TokenClock(engine)
    one = SamplingParams(max_tokens=1)
    ttfts = {label: {"first": [], **{name: [] for name in SECOND_REQUESTS}} for label in engines}
    for label, clock in engines.items():
        clock.add("warm", "Describe the image.", [distinct_image(20_000)], one)
        clock.run_until_first_token("warm")
    for r in range(opts.get("rounds", 5)):
        image = distinct_image(30_000 + r)
        for label in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            clock = engines[label]
            clock.add(f"first{r}", "Describe the image.", [image], one)
            ttfts[label]["first"].append(clock.run_until_first_token(f"first{r}"))
            for name, text in SECOND_REQUESTS.items():
                clock.add(f"{name}{r}", text, [image], one)
                ttfts[label][name].append(clock.run_until_first_token(f"{name}{r}"))
    out = {}
    for label, clock in engines.items():
        stats = clock.engine.stats()
        out[label] = {"ttft_s": {k: statistics.median(v) for k, v in ttfts[label].items()}, "ttft_all_s": ttfts[label],
                      "encoder_images_total": getattr(stats, "encoder_images_total", None),
                      "encoder_seconds_total": getattr(stats, "encoder_seconds_total", None)}
    on, off = out["cache_on"], out["cache_off"]
    speedup = {name: off["ttft_s"][name] / on["ttft_s"][name] for name in SECOND_REQUESTS}
    for name in SECOND_REQUESTS:
        log(f"same image, {name}: TTFT {1000 * on['ttft_s'][name]:.0f} ms with the encoder cache, "
            f"{1000 * off['ttft_s'][name]:.0f} ms without ({speedup[name]:.2f}x); first request "
            f"{1000 * on['ttft_s']['first']:.0f} ms")
    return {"scenario": "same_image", "engine_direct": True, **out, "speedup": speedup,
            "bunny_backend": bunny_backend.__file__, "ignored_knobs": ignored}


def main(argv: list[str]) -> None:
    emit(benchmark(argv[0], json.loads(argv[1]), log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
