"""The launch shapes of the Triton attention kernels per head size: one small table, read at launch (plain Python,
no autotuning on the request path). The rows are starting points (Triton's flash-attention tutorial's shapes for
short varlen tiles, and the decode loop measured in docs/performance.md), not yet tuned on a GPU:
`python -m bench.tune_kernels` sweeps tile sizes, warps and stages on one and prints the rows to put here.
A head size takes the row of the smallest key >= it (the largest key past the end).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillTuning:
    block_m: int      # score rows per tile: query tokens x the query heads sharing a KV head
    block_n: int      # keys per loop iteration
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeTuning:
    tile_tokens: int  # cache tokens per loop iteration (a whole number of blocks, or one block if blocks are larger)
    num_warps: int
    num_stages: int


PREFILL = {
    64: PrefillTuning(block_m=64, block_n=64, num_warps=4, num_stages=3),
    128: PrefillTuning(block_m=64, block_n=64, num_warps=4, num_stages=2),
    256: PrefillTuning(block_m=64, block_n=32, num_warps=8, num_stages=2),
}
DECODE = {
    128: DecodeTuning(tile_tokens=64, num_warps=4, num_stages=3),
    256: DecodeTuning(tile_tokens=64, num_warps=8, num_stages=2),
}


def _row(table: dict, head_dim: int):
    return table[next((k for k in sorted(table) if k >= head_dim), max(table))]


def prefill_tuning(head_dim: int) -> PrefillTuning:
    return _row(PREFILL, head_dim)


def decode_tuning(head_dim: int) -> DecodeTuning:
    return _row(DECODE, head_dim)


def check_tuning(tuning: PrefillTuning | DecodeTuning) -> None:
    """ValueError unless the sizes are powers of two the kernels can tile (>= 16) and warps/stages are positive."""
    sizes = [tuning.block_m, tuning.block_n] if isinstance(tuning, PrefillTuning) else [tuning.tile_tokens]
    if any(n < 16 or n & (n - 1) for n in sizes) or tuning.num_warps < 1 or tuning.num_stages < 1:
        raise ValueError(f"{tuning}: tile sizes must be powers of two >= 16, warps and stages >= 1")
