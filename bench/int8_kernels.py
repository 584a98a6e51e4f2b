"""Op level (issue #30): the CPU linears of one weight shape, our bf16 column panels against the two int8 kernels
(the widening one, csrc/int8_panel_linear.cpp, and the VNNI one, csrc/int8_vnni_linear.cpp), per row count.

Per shape and row count, best of `--repeats` x `--calls` calls, kernels interleaved per repeat. A weight that fits
in L2/L3 ([6144, 1024]) stays in cache between calls: that is the kernel's compute; the LM head ([151936, 1024])
streams from memory. bf16 activations.

`python -m bench.int8_kernels [--shapes 6144x1024,151936x1024] [--rows 1,2,4,10,16,64] [--threads 2] [--out FILE]`
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.common import machine_info
from bunny_backend.ops import cpu_kernels
from bunny_backend.ops.weight_quant import quantize_int8


def kernels(w: torch.Tensor) -> dict:
    """{name: f(x)} for each kernel this CPU has, over the weight w [N, K] (bf16)."""
    n = w.shape[0]
    q, scale = quantize_int8(w)
    out = {}
    if (bf16 := cpu_kernels.panel_linear(torch.bfloat16)) is not None:
        panels = torch.ops.bunny.pack_panels(w)
        out["bf16 panels"] = lambda x: bf16(x, panels, n, None)
    if (widening := cpu_kernels.int8_panel_linear()) is not None:
        int8_panels = torch.ops.bunny.pack_int8_panels(q)
        out["int8 widening"] = lambda x: widening(x, int8_panels, scale, n, None)
    if (vnni := cpu_kernels.int8_vnni_linear()) is not None:
        vnni_panels, comp = torch.ops.bunny.pack_int8_vnni(q)
        out["int8 vnni 16-bit x"] = lambda x: vnni(x, vnni_panels, comp, scale, n, None, 16)
        out["int8 vnni 8-bit x"] = lambda x: vnni(x, vnni_panels, comp, scale, n, None, 8)
    return out


def best_ms(f, x, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        f(x)
    return (time.perf_counter() - start) / calls * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="6144x1024,151936x1024")
    p.add_argument("--rows", default="1,2,4,10,16,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).bfloat16()
        fns = kernels(w)
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, generator=gen).bfloat16()
            best = {name: float("inf") for name in fns}
            for name, f in fns.items():
                f(x)   # warm up
            for _ in range(args.repeats):
                for name, f in fns.items():
                    best[name] = min(best[name], best_ms(f, x, args.calls))
            rows_out.append({"n": n, "k": k, "rows": m, "ms": best})
            print(f"[{n}, {k}] rows {m:3d}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in best.items()),
                  flush=True)
    info = machine_info()
    print(f"cpu: {info.get('cpu_model')}; {args.threads} threads; load average {info['loadavg'][0]:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"machine_info": info, "threads": args.threads, "repeats": args.repeats,
                                        "calls": args.calls, "rows": rows_out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
