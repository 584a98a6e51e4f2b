"""Decode steps of the same model unquantized and quantized (`int8`, `w8a8`), engine-direct, in one run (issue #30).

One engine per method (same dtype) in one process; per batch size each gets n image requests prefilled once, then
decode steps alternate between them in windows of a few steps (in turn forward and backward), so all see the same
load from other processes. Prints the median ms per step of each and the median of the per-window ratios to `none`
(none / method: above 1 means the method is faster), with the CPU.

`python -m bench.quantized_decode [--model qwen] [--methods none,int8,w8a8] [--batch-sizes 1,10]
[--dtype bfloat16] [--threads 2] [--window 4] [--pairs 8] [--out FILE]`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.common import Workload, machine_info
from bench.cpu_decode import ms_per_step
from bench.models import SPECS, ensure_checkpoint
from bench.profile import into_decode
from bench.run import kv_cache_bytes
from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_client.perf_stats import parse_batch_sizes


def make_engine(path: str, work: Workload, kv_bytes: int, dtype: str, quantization: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=path, device="cpu", dtype=dtype, quantization=quantization,
                                  max_num_seqs=max(16, max(work.batch_sizes)), kv_cache_memory_bytes=kv_bytes,
                                  num_threads=work.threads))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quantized_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen", choices=sorted(SPECS))
    p.add_argument("--methods", default="none,int8,w8a8", help="comma-separated, none first (the baseline)")
    p.add_argument("--batch-sizes", default="1,10")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=4, help="decode steps per measurement")
    p.add_argument("--pairs", type=int, default=8, help="measurements per engine and batch size")
    p.add_argument("--demo-tokenizer", action="store_true",
                   help="the model's shape with the demo tokenizer (no qwen-agent wheel to fetch): same bytes a step")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    spec = SPECS[args.model]
    if args.demo_tokenizer:
        spec = dataclasses.replace(spec, name=f"{spec.name}-demo-tokenizer", tokenizer="demo")
    sizes = parse_batch_sizes(args.batch_sizes)
    methods = tuple(args.methods.split(","))
    if methods[0] != "none" or len(methods) < 2:
        p.error(f"--methods must start with none and name at least one more, got {args.methods!r}")
    work = Workload(batch_sizes=sizes, max_tokens=2 * args.window * (args.pairs + 1) + 8, threads=args.threads)
    path = str(ensure_checkpoint(spec))
    engines = {m: make_engine(path, work, kv_cache_bytes(spec, work), args.dtype, m) for m in methods}
    weights = {m: sum(r["weights_bytes"] for r in e.memory_reports) for m, e in engines.items()}
    rows = []
    for n in sizes:
        for engine in engines.values():
            into_decode(engine, work, n, max_tokens=2 * args.window * args.pairs + 2 * args.window + 8)
        times = {m: [] for m in methods}
        for i in range(args.pairs + 1):
            for m in (methods if i % 2 else methods[::-1]):
                ms = ms_per_step(engines[m], args.window)
                if i:   # the first pair warms both up
                    times[m].append(ms)
        for engine in engines.values():
            while engine.has_unfinished():
                engine.step()
        row = {"batch": n}
        for m in methods:
            row[f"{m}_ms_per_step"] = statistics.median(times[m])
            row[f"{m}_all_ms"] = times[m]
        line = f"{args.dtype} batch {n:2d}: none {row['none_ms_per_step']:7.2f} ms/step"
        for m in methods[1:]:
            row[f"{m}_speedup_median_of_pairs"] = ratio = statistics.median(
                x / y for x, y in zip(times["none"], times[m]))
            line += f", {m} {row[f'{m}_ms_per_step']:7.2f} ms/step ({ratio:.2f}x)"
        rows.append(row)
        print(line, flush=True)
    info = machine_info()
    print("weights: " + ", ".join(f"{m} {b / 1e6:.0f} MB" for m, b in weights.items()) +
          f"; cpu: {info.get('cpu_model')}; {torch.get_num_threads()} threads; load average {info['loadavg'][0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"machine_info": info, "model": spec.name, "dtype": args.dtype,
                                        "window": args.window, "pairs": args.pairs, "weights_bytes": weights,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
