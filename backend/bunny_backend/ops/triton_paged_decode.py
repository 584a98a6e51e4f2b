"""Paged decode attention as one Triton kernel: each program takes one sequence and one KV head, walks the
sequence's blocks through its block table and keeps an online softmax, so K/V are never gathered into a
contiguous copy. All the query heads that share the KV head (GQA) are handled in the same program, as the rows
of one tile, so each K/V block is read once per KV head.

Each loop iteration takes several cache blocks at once (TILE_TOKENS tokens, gathered through a vector of table
entries): one block of 16 tokens per iteration left the loop latency-bound (64 us for an 800-token context on an
H200, 1.5 ms of a 3.9 ms decode step of the 2B model; docs/performance.md).

`launch_config` (plain Python, testable without a GPU) validates the inputs and computes grid, strides and tile
sizes; `paged_decode` launches. Without triton, `triton` is None and the CUDA backend decodes with portable code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MIN_DOT = 16   # tl.dot needs every tile dimension >= 16
TILE_TOKENS = 64   # cache tokens per loop iteration (a whole number of blocks, or one block if blocks are larger)


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int]          # (batch, num_kv_heads)
    queries_per_kv: int
    group: int                     # queries_per_kv padded to a power of two >= 16 (rows of the score tile)
    head_dim: int
    block_size: int
    blocks_per_tile: int           # cache blocks gathered per loop iteration
    q_strides: tuple[int, int]     # (token, head); the head_dim stride is 1
    cache_strides: tuple[int, int, int]   # (block, slot, kv head); same for K and V
    table_stride: int


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (the backend then falls back), or None."""
    return unsupported_for(q.dtype, k_cache.shape[3], k_cache.shape[1])


def unsupported_for(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    if triton is None:
        return "triton is not installed"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the kernel takes float16/bfloat16)"
    if not (_pow2(head_dim) and head_dim >= MIN_DOT and _pow2(block_size) and block_size >= MIN_DOT):
        return f"head_dim {head_dim} / block_size {block_size} must be powers of two >= {MIN_DOT}"
    return None


def launch_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor) -> LaunchConfig:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables int32 [B, M]; context_lens int32 [B]."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [B, H, D] and caches [blocks, block_size, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of {head_dim}, caches {kv_heads} KV heads of {cache_dim}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the caches need a unit stride on head_dim and K/V caches the same strides")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and context_lens must be int32, got {block_tables.dtype}, "
                         f"{context_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables must be [{batch}, M] and context_lens [{batch}]")
    rep = heads // kv_heads
    return LaunchConfig(grid=(batch, kv_heads), queries_per_kv=rep,
                        group=max(MIN_DOT, 1 << (rep - 1).bit_length()), head_dim=head_dim, block_size=block_size,
                        blocks_per_tile=max(1, TILE_TOKENS // block_size),
                        q_strides=(q.stride(0), q.stride(1)), cache_strides=k_cache.stride()[:3],
                        table_stride=block_tables.stride(0))


if triton is not None:
    # The block-table stride changes with the longest sequence of each step: no recompilation for it.
    @triton.jit(do_not_specialize=["stride_tb"])
    def _paged_decode_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, scale,
                             stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb,
                             QUERIES_PER_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lens_ptr + seq)
        num_blocks = tl.cdiv(length, BLOCK_SIZE)
        rows = tl.arange(0, GROUP)
        dims = tl.arange(0, HEAD_DIM)
        tokens = tl.arange(0, BLOCKS_PER_TILE * BLOCK_SIZE)       # positions within one tile
        heads = kv_head * QUERIES_PER_KV + rows
        row_ok = rows < QUERIES_PER_KV
        q_offs = seq * stride_qt + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)          # [GROUP, HEAD_DIM]

        m = tl.full([GROUP], float("-inf"), tl.float32)
        l = tl.zeros([GROUP], tl.float32)
        acc = tl.zeros([GROUP, HEAD_DIM], tl.float32)
        for i in range(0, tl.cdiv(num_blocks, BLOCKS_PER_TILE)):
            index = i * BLOCKS_PER_TILE + tokens // BLOCK_SIZE           # block-table column of each token
            # Table entries past the sequence's last block (-1 padding, or past the row) are never read.
            block = tl.load(tables_ptr + seq * stride_tb + index, mask=index < num_blocks, other=0).to(tl.int64)
            valid = (i * BLOCKS_PER_TILE * BLOCK_SIZE + tokens) < length
            kv_offs = block[:, None] * stride_cb + (tokens % BLOCK_SIZE)[:, None] * stride_cs \
                + kv_head * stride_ch + dims[None, :]
            k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0)     # [TILE, HEAD_DIM]
            v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                                 # [GROUP, TILE], fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row per sequence [B, H, D] over its context_lens[i] cached tokens. Padding entries of the block
    table (-1) past a sequence's last block are never read."""
    q = q.contiguous()   # the output is written with q's strides
    cfg = launch_config(q, k_cache, v_cache, block_tables, context_lens)
    out = torch.empty_like(q)
    _paged_decode_kernel[cfg.grid](out, q, k_cache, v_cache, block_tables, context_lens, scale,
                                   *cfg.q_strides, *cfg.cache_strides, cfg.table_stride,
                                   QUERIES_PER_KV=cfg.queries_per_kv, GROUP=cfg.group, HEAD_DIM=cfg.head_dim,
                                   BLOCK_SIZE=cfg.block_size, BLOCKS_PER_TILE=cfg.blocks_per_tile)
    return out
