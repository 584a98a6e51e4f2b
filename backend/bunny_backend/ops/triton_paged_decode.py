"""Paged decode attention in Triton: each program takes one sequence, one KV head and one split of the context,
walks its blocks through the block table and keeps an online softmax, so K/V are never gathered into a contiguous
copy. The query heads that share the KV head (GQA) are the rows of one tile, so each K/V block is read once per
KV head; with MHA (one query head per KV head) the scores are a vector product instead of a 16-row `tl.dot` of
which one row is real.

Split context (flash-decoding): when batch x KV heads programs would leave SMs idle, each sequence's context is cut
into `num_splits` contiguous ranges of tiles, each program writes its partial max, sum and unnormalised output
(float32), and one reduce kernel combines them. The split count depends on the batch size and the head count only,
never on the lengths, so a captured CUDA graph stays valid for any context (a split past the end of a short one
writes an empty partial).

Each loop iteration takes several cache blocks at once (the tuning's tile_tokens, triton_tuning.py, gathered through a vector of table
entries): one block of 16 tokens per iteration left the loop latency-bound (64 us for an 800-token context on an
H200, 1.5 ms of a 3.9 ms decode step of the 2B model; docs/performance.md).

`launch_config` (plain Python, testable without a GPU) validates the inputs and computes grid, strides, tile
sizes and splits; `paged_decode` launches. Without triton, `triton` is None and the CUDA backend decodes with
portable code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bunny_backend.ops.triton_support import (MIN_DOT, attention_unsupported_for, check_paged_operands, next_pow2, tl,
                                               triton)
from bunny_backend.ops.triton_tuning import DecodeTuning, check_tuning, decode_tuning

MAX_SPLITS = 16    # the most context splits per sequence (the reduce kernel's tile)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int, int]     # (batch, num_kv_heads, num_splits)
    queries_per_kv: int
    group: int                     # score rows: 1 with MHA, else queries_per_kv padded to a power of two >= 16
    head_dim: int
    block_size: int
    blocks_per_tile: int           # cache blocks gathered per loop iteration
    q_strides: tuple[int, int]     # (token, head); the head_dim stride is 1
    cache_strides: tuple[int, int, int]   # (block, slot, kv head); same for K and V
    table_stride: int
    num_warps: int
    num_stages: int

    @property
    def num_splits(self) -> int:
        return self.grid[2]


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (the backend then falls back), or None."""
    return attention_unsupported_for(q.dtype, k_cache.shape[3], k_cache.shape[1])


unsupported_for = attention_unsupported_for


def split_count(batch: int, kv_heads: int, num_sms: int) -> int:
    """Context splits per sequence: enough that batch x kv_heads x splits programs cover every SM once."""
    programs = batch * kv_heads
    if programs >= num_sms:
        return 1
    return min(MAX_SPLITS, -(-num_sms // programs))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, num_splits: int = 1, tuning: DecodeTuning | None = None) -> LaunchConfig:
    """q [B, H, D]; caches [num_blocks, block_size, Hkv, D]; block_tables int32 [B, M]; context_lens int32 [B].
    tuning: tile and warps (None: the head size's row of triton_tuning.DECODE; bench/tune_kernels.py passes others)."""
    heads, head_dim, block_size, kv_heads = check_paged_operands(q, k_cache, v_cache, "[B, H, D]")
    batch = q.shape[0]
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and context_lens must be int32, got {block_tables.dtype}, "
                         f"{context_lens.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables must be [{batch}, M] and context_lens [{batch}]")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {num_splits} must be 1..{MAX_SPLITS}")
    rep = heads // kv_heads
    tuning = tuning or decode_tuning(head_dim)
    check_tuning(tuning)
    return LaunchConfig(grid=(batch, kv_heads, num_splits), queries_per_kv=rep,
                        group=1 if rep == 1 else max(MIN_DOT, next_pow2(rep)), head_dim=head_dim,
                        block_size=block_size, blocks_per_tile=max(1, tuning.tile_tokens // block_size),
                        q_strides=(q.stride(0), q.stride(1)), cache_strides=k_cache.stride()[:3],
                        table_stride=block_tables.stride(0), num_warps=tuning.num_warps,
                        num_stages=tuning.num_stages)


if triton is not None:
    # The block-table stride changes with the longest sequence of each step, the split count with the batch: no
    # recompilation for them.
    @triton.jit(do_not_specialize=["stride_tb", "num_splits"])
    def _paged_decode_kernel(out_ptr, part_acc_ptr, part_ml_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,
                             scale_log2, num_splits, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_tb,
                             QUERIES_PER_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, BLOCKS_PER_TILE: tl.constexpr, SPLIT: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lens_ptr + seq)
        num_blocks = tl.cdiv(length, BLOCK_SIZE)
        num_tiles = tl.cdiv(num_blocks, BLOCKS_PER_TILE)
        if SPLIT:
            per_split = tl.cdiv(num_tiles, num_splits)
            first_tile = tl.program_id(2) * per_split
            end_tile = tl.minimum(first_tile + per_split, num_tiles)
        else:
            first_tile = 0
            end_tile = num_tiles
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
        for i in range(first_tile, end_tile):
            index = i * BLOCKS_PER_TILE + tokens // BLOCK_SIZE           # block-table column of each token
            # Table entries past the sequence's last block (-1 padding, or past the row) are never read.
            block = tl.load(tables_ptr + seq * stride_tb + index, mask=index < num_blocks, other=0).to(tl.int64)
            valid = (i * BLOCKS_PER_TILE * BLOCK_SIZE + tokens) < length
            kv_offs = block[:, None] * stride_cb + (tokens % BLOCK_SIZE)[:, None] * stride_cs \
                + kv_head * stride_ch + dims[None, :]
            k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0)     # [TILE, HEAD_DIM]
            v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0)
            if GROUP == 1:   # MHA: one query row, a vector product
                s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], 2) * scale_log2
            else:
                s = tl.dot(q, tl.trans(k)) * scale_log2                        # [GROUP, TILE], fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if GROUP == 1:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        if SPLIT:
            # partial (max, sum, unnormalised output) of row (seq, head, split), float32
            part = (seq * tl.num_programs(1) * QUERIES_PER_KV + heads) * num_splits + tl.program_id(2)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + part * 2, m, mask=row_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l, mask=row_ok)
        else:
            out = acc / l[:, None]
            tl.store(out_ptr + q_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_splits"])
    def _reduce_splits_kernel(out_ptr, part_acc_ptr, part_ml_ptr, num_splits, stride_qt, stride_qh,
                              HEAD_DIM: tl.constexpr, MAX_SPLITS: tl.constexpr):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, MAX_SPLITS)
        dims = tl.arange(0, HEAD_DIM)
        ok = splits < num_splits
        part = (seq * tl.num_programs(1) + head) * num_splits + splits
        m = tl.load(part_ml_ptr + part * 2, mask=ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + part * 2 + 1, mask=ok, other=0.0)
        acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
        # An empty split (past a short context's end) has m = -inf and weighs 0; every sequence has a token.
        weight = tl.exp2(m - tl.max(m, 0))
        out = tl.sum(weight[:, None] * acc, 0) / tl.sum(weight * l, 0)
        tl.store(out_ptr + seq * stride_qt + head * stride_qh + dims, out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, num_splits: int | None = None,
                 tuning: DecodeTuning | None = None) -> torch.Tensor:
    """One query row per sequence [B, H, D] over its context_lens[i] cached tokens. Padding entries of the block
    table (-1) past a sequence's last block are never read. num_splits: context splits per sequence (None: as
    `split_count` chooses for the device; 1 off CUDA)."""
    q = q.contiguous()   # the output is written with q's strides
    if num_splits is None:
        num_splits = split_count(q.shape[0], k_cache.shape[2], _num_sms(q.device)) if q.is_cuda else 1
    cfg = launch_config(q, k_cache, v_cache, block_tables, context_lens, num_splits, tuning)
    out = torch.empty_like(q)
    rows = q.shape[0] * q.shape[1] * num_splits if num_splits > 1 else 1   # one unused row: a real pointer
    part_acc = torch.empty((rows, cfg.head_dim), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((rows, 2), dtype=torch.float32, device=q.device)
    _paged_decode_kernel[cfg.grid](out, part_acc, part_ml, q, k_cache, v_cache, block_tables, context_lens,
                                   scale * LOG2E, num_splits, *cfg.q_strides, *cfg.cache_strides, cfg.table_stride,
                                   QUERIES_PER_KV=cfg.queries_per_kv, GROUP=cfg.group, HEAD_DIM=cfg.head_dim,
                                   BLOCK_SIZE=cfg.block_size, BLOCKS_PER_TILE=cfg.blocks_per_tile,
                                   SPLIT=num_splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits > 1:
        _reduce_splits_kernel[(q.shape[0], q.shape[1])](out, part_acc, part_ml, num_splits, *cfg.q_strides,
                                                        HEAD_DIM=cfg.head_dim, MAX_SPLITS=MAX_SPLITS)
    return out
