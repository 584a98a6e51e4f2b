"""bf16 against fp32 decode on this CPU: the measurement behind `dtype auto` (engine/worker/device.cpu_auto_dtype).

Two engines on the same checkpoint, one per dtype, each in the layout it gets here (model/cpu_layout.py), decode
the same text requests; the measurements alternate between them, several times, so load from other processes
falls on both alike (the median of the per-pair ratios is the figure to trust on a busy machine). Prints ms per decode step (median over repeats) per batch size and the bf16 speed-up, with
the CPU's capabilities.

`python -m bench.cpu_dtypes [--model cpu] [--batch-sizes 1,10] [--steps 32] [--repeats 5]`
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import Workload, machine_info
from bench.engine_direct import make_engine
from bench.models import SPECS, ensure_checkpoint
from bench.run import kv_cache_bytes
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_client.perf_stats import parse_batch_sizes


def decode_ms_per_step(engine, prompt: str, n: int, steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"r{n}-{i}-{time.monotonic_ns()}", prompt, [], params)
    while engine.scheduler.num_waiting or any(s.num_completion_tokens == 0 for s in engine.scheduler.running):
        engine.step()                            # prefills
    engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    while engine.has_unfinished():
        engine.step()
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_dtypes", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpu", choices=sorted(SPECS))
    p.add_argument("--batch-sizes", default="1,10")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    spec = SPECS[args.model]
    sizes = parse_batch_sizes(args.batch_sizes)
    work = Workload(batch_sizes=sizes, max_tokens=args.steps + 8, prefix_caching=False)
    path = str(ensure_checkpoint(spec))
    engines = {d: make_engine(path, work, kv_cache_bytes(spec, work), d) for d in ("float32", "bfloat16")}
    layouts = {d: type(e.model.model.layers[0].mlp.down_proj).__name__ for d, e in engines.items()}
    times: dict[tuple[str, int], list[float]] = {}
    for d, e in engines.items():                 # warm-up
        decode_ms_per_step(e, work.prompt, 1, 4)
    for _ in range(args.repeats):
        for n in sizes:
            for d, e in engines.items():
                times.setdefault((d, n), []).append(decode_ms_per_step(e, work.prompt, n, args.steps))
    info = machine_info()
    rows = []
    for n in sizes:
        f32, b16 = statistics.median(times[("float32", n)]), statistics.median(times[("bfloat16", n)])
        pairs = statistics.median(a / b for a, b in zip(times[("float32", n)], times[("bfloat16", n)]))
        rows.append({"batch": n, "float32_ms_per_step": f32, "bfloat16_ms_per_step": b16, "bf16_speedup": f32 / b16,
                     "bf16_speedup_median_of_pairs": pairs,
                     "float32_all_ms": times[("float32", n)], "bfloat16_all_ms": times[("bfloat16", n)]})
        print(f"batch {n:2d}: float32 {f32:7.2f} ms/step ({n * 1e3 / f32:6.1f} tok/s)  bfloat16 {b16:7.2f} ms/step "
              f"({n * 1e3 / b16:6.1f} tok/s)  bf16 speed-up {f32 / b16:.2f}x (median of pairs {pairs:.2f}x)")
    print(f"cpu: {info.get('cpu_model')}, {json.dumps(info['cpu_features'])}; layouts {layouts}; "
          f"load average {info['loadavg'][0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"machine_info": info, "model": args.model, "steps": args.steps,
                                        "repeats": args.repeats, "layouts": layouts, "rows": rows,
                                        "threads": torch.get_num_threads()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
