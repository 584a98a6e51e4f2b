"""The C++ paged decode kernel against the portable decode (gather + SDPA), engine-direct, in one run.

Per dtype one engine; per batch size n image requests are prefilled once, then their decode steps alternate between
the two paths in windows of a few steps (BUNNY_CPU_KERNELS flips per window, first one path then the other leading),
so both see the same contexts (~240-300 tokens with the default image prompt) and the same load from other
processes. Prints the median ms per step of each path and the median of the per-window-pair ratios (portable /
kernel: above 1 means the kernel is faster), with the CPU.

`python -m bench.cpu_decode [--model qwen] [--batch-sizes 1,10] [--dtypes float32,bfloat16] [--threads 2]
[--window 4] [--pairs 8] [--out FILE]`
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import Workload, machine_info
from bench.engine_direct import make_engine
from bench.models import SPECS, ensure_checkpoint
from bench.profile import into_decode
from bench.run import kv_cache_bytes
from bunny_backend.ops import cpu_kernels
from bunny_client.perf_stats import parse_batch_sizes

PATHS = {"kernel": "1", "portable": "0"}   # BUNNY_CPU_KERNELS per path


def ms_per_step(engine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return 1e3 * (time.perf_counter() - t0) / steps


def measure(engine, work: Workload, n: int, window: int, pairs: int) -> dict[str, list[float]]:
    into_decode(engine, work, n, max_tokens=2 * window * pairs + 2 * window + 8)
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(pairs + 1):
        order = list(PATHS) if i % 2 else list(PATHS)[::-1]
        for path in order:
            os.environ[cpu_kernels.ENV_VAR] = PATHS[path]
            ms = ms_per_step(engine, window)
            if i:                                  # the first pair warms both paths up
                times[path].append(ms)
    os.environ.pop(cpu_kernels.ENV_VAR)
    while engine.has_unfinished():
        engine.step()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen", choices=sorted(SPECS))
    p.add_argument("--batch-sizes", default="1,10")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=4, help="decode steps per measurement")
    p.add_argument("--pairs", type=int, default=8, help="measurements per path and batch size")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if cpu_kernels.paged_decode() is None:
        print(f"the kernel is not available: {cpu_kernels.load('paged_decode')}", file=sys.stderr)
        return 1
    spec = SPECS[args.model]
    sizes = parse_batch_sizes(args.batch_sizes)
    work = Workload(batch_sizes=sizes, max_tokens=2 * args.window * (args.pairs + 1) + 8, threads=args.threads)
    path = str(ensure_checkpoint(spec))
    rows = []
    for dtype in args.dtypes.split(","):
        engine = make_engine(path, work, kv_cache_bytes(spec, work), dtype)
        for n in sizes:
            t = measure(engine, work, n, args.window, args.pairs)
            k, g = statistics.median(t["kernel"]), statistics.median(t["portable"])
            ratio = statistics.median(b / a for a, b in zip(t["kernel"], t["portable"]))
            rows.append({"dtype": dtype, "batch": n, "kernel_ms_per_step": k, "portable_ms_per_step": g,
                         "speedup_median_of_pairs": ratio, "kernel_all_ms": t["kernel"],
                         "portable_all_ms": t["portable"]})
            print(f"{dtype:8s} batch {n:2d}: kernel {k:7.2f} ms/step, portable {g:7.2f} ms/step, "
                  f"portable/kernel {g / k:.2f}x (median of pairs {ratio:.2f}x)", flush=True)
        del engine
    info = machine_info()
    print(f"cpu: {info.get('cpu_model')}, {json.dumps(info['cpu_features'])}; {torch.get_num_threads()} threads; "
          f"load average {info['loadavg'][0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"machine_info": info, "model": args.model, "window": args.window,
                                        "pairs": args.pairs, "threads": torch.get_num_threads(), "rows": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
