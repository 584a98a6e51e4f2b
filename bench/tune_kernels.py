"""Sweeps the Triton attention kernels' launch shapes (tile sizes, warps, stages) on a CUDA GPU and prints the best
per head size as rows for backend/bunny_backend/ops/triton_tuning.py's tables (which the kernels read at launch;
nothing is autotuned on the request path). GPU-only; a few minutes.

    python -m bench.tune_kernels [--head-dims 128,64] [--quick]

Per head size, one shape: 128 as Bunny-2B (16 heads, MHA), 64 as a GQA model (14 query heads over 2 KV heads).
- decode: batches 1, 64 and 256 over ~900-token contexts, with the split count the kernel chooses; a candidate's
  score is the geometric mean of its times over the batches;
- prefill: one mixed step as the mixed-step graphs run it, 16 prompts of ~400 tokens after a 120-token cached prefix
  ending mid-block plus 64 one-token decode rows, in one varlen launch.
Each candidate's output is checked against the table's current row (bf16 tolerance); candidates that fail to compile
(shared memory, register pressure) or disagree are listed as such and left out.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys

import torch

from bench.kernel_times import BLOCK, DTYPE, cuda_ms

SHAPES = {128: (16, 16), 64: (14, 2)}   # head dim -> (heads, kv heads)
PREFILL_GRID = dict(block_m=(32, 64, 128), block_n=(32, 64, 128), num_warps=(2, 4, 8), num_stages=(1, 2, 3, 4))
DECODE_GRID = dict(tile_tokens=(32, 64, 128, 256), num_warps=(1, 2, 4, 8), num_stages=(1, 2, 3, 4))
QUICK = dict(num_stages=(2, 3))


def candidates(grid: dict, cls, quick: bool) -> list:
    grid = {**grid, **({k: v for k, v in QUICK.items() if k in grid} if quick else {})}
    return [cls(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def paged_inputs(lens: list[int], heads: int, kv_heads: int, head_dim: int, gen: torch.Generator):
    blocks = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks) + 1, generator=gen).tolist()
    tables = [perm[sum(blocks[:i]):sum(blocks[:i + 1])] for i in range(len(lens))]
    width = max(blocks)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    cache = lambda: torch.randn(sum(blocks) + 1, BLOCK, kv_heads, head_dim, generator=gen).to(DTYPE).cuda()  # noqa: E731
    return cache(), cache(), table


def sweep(name: str, run, grid: list, default) -> list[tuple[float, object]]:
    """(score, tuning) of every candidate that compiles and agrees with the default's output, best first."""
    want = run(default)[1]
    scored = []
    for tuning in grid:
        try:
            score, out = run(tuning)
        except Exception as e:   # noqa: BLE001 - a shape the GPU cannot take
            print(f"  {name} {tuning}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:80]})", flush=True)
            continue
        if not torch.allclose(out.float(), want.float(), atol=3e-2, rtol=3e-2):
            print(f"  {name} {tuning}: DISAGREES with the table's row, left out", flush=True)
            continue
        scored.append((score, tuning))
    return sorted(scored, key=lambda st: st[0])


def decode_runner(head_dim: int, gen: torch.Generator):
    from bunny_backend.ops import triton_paged_decode as tpd
    heads, kv_heads = SHAPES[head_dim]
    cases = []
    for batch in (1, 64, 256):
        lens = [900 + (i * 37) % 64 for i in range(batch)]
        k, v, table = paged_inputs(lens, heads, kv_heads, head_dim, gen)
        q = torch.randn(batch, heads, head_dim, generator=gen).to(DTYPE).cuda()
        cases.append((q, k, v, table, torch.tensor(lens, dtype=torch.int32, device="cuda")))

    def run(tuning):
        times, outs = [], []
        for q, k, v, table, lens in cases:
            fn = lambda: tpd.paged_decode(q, k, v, table, lens, head_dim ** -0.5, tuning=tuning)   # noqa: E731
            outs.append(fn().flatten())
            times.append(cuda_ms(fn))
        return math.exp(sum(map(math.log, times)) / len(times)), torch.cat(outs)
    return run


def prefill_runner(head_dim: int, gen: torch.Generator):
    from bunny_backend.ops import triton_prefill
    heads, kv_heads = SHAPES[head_dim]
    new = [400 + (i * 13) % 40 for i in range(16)] + [1] * 64
    totals = [120 + n for n in new[:16]] + [900 + i for i in range(64)]
    k, v, table = paged_inputs(totals, heads, kv_heads, head_dim, gen)
    q = torch.randn(sum(new), heads, head_dim, generator=gen).to(DTYPE).cuda()
    cu = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    lens = torch.tensor(totals, dtype=torch.int32, device="cuda")

    def run(tuning):
        fn = lambda: triton_prefill.paged_prefill(q, k, v, table, cu, lens, head_dim ** -0.5, tuning=tuning)  # noqa: E731
        return cuda_ms(fn, repeats=10), fn()
    return run


@torch.inference_mode()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", default="128,64", help="comma-separated, of " + ",".join(map(str, SHAPES)))
    parser.add_argument("--quick", action="store_true", help="stages 2 and 3 only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_kernels: needs a CUDA device")
        return 1
    from bunny_backend.ops import triton_tuning as tt
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {DTYPE}, blocks of {BLOCK}")
    rows = {"PREFILL": [], "DECODE": []}
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        heads, kv_heads = SHAPES[head_dim]
        for table, run, grid, default in (
                ("DECODE", decode_runner(head_dim, gen), candidates(DECODE_GRID, tt.DecodeTuning, args.quick),
                 tt.decode_tuning(head_dim)),
                ("PREFILL", prefill_runner(head_dim, gen), candidates(PREFILL_GRID, tt.PrefillTuning, args.quick),
                 tt.prefill_tuning(head_dim))):
            print(f"{table.lower()}, head dim {head_dim} ({heads} heads, {kv_heads} KV): {len(grid)} candidates",
                  flush=True)
            scored = sweep(table.lower(), run, grid, default)
            base = run(default)[0]
            print(f"| {table.lower()} d={head_dim} | ms | vs the table's row |\n| --- | --- | --- |")
            print(f"| table's row {default} | {base:.4f} | 1.00 |")
            for score, tuning in scored[:5]:
                print(f"| {tuning} | {score:.4f} | {base / score:.2f}x |")
            if scored:
                rows[table].append(f"    {head_dim}: {scored[0][1]!r},")
    print("\nRows for backend/bunny_backend/ops/triton_tuning.py:")
    for table, lines in rows.items():
        print(f"{table} = {{\n" + "\n".join(lines) + "\n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
