"""Batch-1 decode against the machine's read bandwidth, both measured in the same minutes (issue #16's target).

The bandwidth of a shared VM moves by tens of percent from one run to the next (docs/performance.md), so each round measures
the read bandwidth (`sum()` of 1 GiB, best of 3) and then times decode steps of one sequence on the engine; the
fraction is weight bytes per step x steps/s over that round's bandwidth.

    python -m bench.decode_bandwidth [--model qwen] [--dtype bfloat16] [--rounds 3] [--steps 24] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from bench.common import Workload, machine_info, machine_name
from bench.engine_direct import make_engine
from bench.models import SPECS, decode_weight_bytes, ensure_checkpoint
from bench.profile import into_decode
from bench.roofline import measure_read_bandwidth
from bench.run import kv_cache_bytes


def time_steps(engine, steps: int) -> float:
    """Median seconds of one decode step."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.decode_bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default="qwen")
    p.add_argument("--dtype", default=None, help="the model's own dtype by default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out")
    args = p.parse_args(argv)
    checkpoint = ensure_checkpoint(SPECS[args.model])
    spec = replace(SPECS[args.model], dtype=args.dtype or SPECS[args.model].dtype)   # the bytes a step reads
    work = Workload(batch_sizes=[1], max_tokens=args.rounds * args.steps + 32)
    engine = make_engine(str(checkpoint), work, kv_cache_bytes(spec, work), spec.dtype)
    into_decode(engine, work, 1, work.max_tokens)
    weight_bytes = decode_weight_bytes(spec)
    rounds = []
    for _ in range(args.rounds):
        read = measure_read_bandwidth(repeats=3)["bytes_per_s"]
        step_s = time_steps(engine, args.steps)
        rounds.append({"read_bandwidth_bytes_per_s": read, "step_s": step_s,
                       "decode_bytes_per_s": weight_bytes / step_s, "fraction": weight_bytes / step_s / read})
        print(f"read {read / 1e9:.1f} GB/s; decode step {step_s * 1e3:.1f} ms = {weight_bytes / step_s / 1e9:.1f} "
              f"GB/s of weights: {rounds[-1]['fraction']:.0%}", flush=True)
    info = machine_info()
    result = {"model": spec.name, "dtype": str(engine.dtype), "threads": torch.get_num_threads(),
              "decode_weight_bytes": weight_bytes, "rounds": rounds, "machine": info,
              "median_fraction": statistics.median(r["fraction"] for r in rounds)}
    print(f"{machine_name(info)}, {spec.name} model, {engine.dtype}: batch-1 decode at "
          f"{result['median_fraction']:.0%} of the read bandwidth (median of {args.rounds} rounds)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
