"""The serving-under-load scenarios of `./build.sh bench` (stall, arrivals, same image twice; each its own worker
module and process), their before/after pairs against a baseline revision, and their targets."""
from __future__ import annotations

import json

from bench.models import SPECS, ModelSpec, ensure_checkpoint, kv_bytes_per_token
from bench.repeat import alternate, median_of

SCENARIOS = ("stall", "arrivals", "same-image")
WORKERS = {"stall": "stall", "arrivals": "arrivals", "same-image": "same_image"}
COMPARED_WITH_BASELINE = ("stall", "arrivals")   # same-image compares cache on/off within this revision
KV_TOKENS = 8192                                  # room for six streams and a 1500-token prompt, or 16 image requests
# A tower of ViT-B's size on the cpu model: its cost per image against the LLM's per prompt token is near
# Bunny-2B's (SigLIP-so400m at 729 tokens ~ 240 prompt tokens of Qwen-1.8B; this one ~ 125 of the cpu LLM), where
# the cpu model's own 4-layer, 256-wide tower costs ~ 3.
SAME_IMAGE_EXTRA = {"cpu": "cpu-vitb"}


def parse_knobs(items: list[str]) -> dict:
    knobs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--knob wants KEY=VALUE, got {item!r}")
        knobs[key] = int(value) if value.lstrip("-").isdigit() else value
    return knobs


def run_scenarios(spec: ModelSpec, path: str, args, run_worker, log, baseline=None) -> dict:
    """{scenario: {"after": result, "before": result (with a baseline)}}; baseline = (env, commit) or None."""
    out: dict[str, dict] = {}
    for name in args.scenarios:
        knobs = {"num_threads": args.threads, **args.knobs} if args.threads else args.knobs
        opts = {"kv_cache_bytes": KV_TOKENS * kv_bytes_per_token(spec), "knobs": knobs,
                "rate_per_s": args.arrival_rate, "duration_s": args.arrivals_duration}
        runs = {"after": (path, None)}
        order = ["after"]
        if baseline and name in COMPARED_WITH_BASELINE:
            runs["before"] = (path, baseline[0])
            order = alternate(args.repeats, ("after", "before"))
        if name == "same-image" and spec.name in SAME_IMAGE_EXTRA:
            extra = SPECS[SAME_IMAGE_EXTRA[spec.name]]
            runs[f"after, {extra.name} model"] = (str(ensure_checkpoint(extra, log=log)), None)
            order.append(f"after, {extra.name} model")
        results: dict[str, list[dict]] = {}
        for label in order:
            model_path, env = runs[label]
            log(f"--- {spec.name}: scenario {name} ({label}) ---")
            results.setdefault(label, []).append(run_worker(WORKERS[name], model_path, json.dumps(opts), env=env))
        out[name] = {label: {**median_of(r), "repeats": len(r)} for label, r in results.items()}
    return out


def scenario_targets(scenarios: dict) -> dict:
    """The issue's targets for the scenarios this run measured: name -> (met, detail)."""
    t = {}
    stall = scenarios.get("stall", {})
    after, before = stall.get("after", {}), stall.get("before", {})
    if "gap_max_over_latency" in after:
        ratio = after["gap_max_over_latency"]
        t["stall: longest gap <= 25% of the long prompt's latency"] = (ratio <= 0.25, f"{100 * ratio:.0f}%")
    if "long_prompt_latency_s" in after and "long_prompt_latency_s" in before:
        growth = after["long_prompt_latency_s"] / before["long_prompt_latency_s"]
        t["stall: long prompt's latency <= 1.2x before"] = (growth <= 1.2, f"{growth:.2f}x")
    arr = scenarios.get("arrivals", {}).get("after", {})
    if "itl_p99_over_p50" in arr:
        t["arrivals: inter-token p99 <= 3x median"] = (arr["itl_p99_over_p50"] <= 3, f"{arr['itl_p99_over_p50']:.2f}x")
    for label, res in scenarios.get("same-image", {}).items():
        for name, speedup in res.get("speedup", {}).items():
            t[f"same image ({label}, {name}): TTFT >= 2x faster with the cache"] = (speedup >= 2, f"{speedup:.2f}x")
    return t
