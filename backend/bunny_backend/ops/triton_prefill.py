"""Varlen prefill attention over the paged cache as one Triton kernel: every sequence of a step (a fresh prompt, a
continuing chunk, a prompt after a cached prefix that may end mid-block, a one-token query) in one launch, reading
K/V through the block tables (the step's new K/V are already stored), causal, GQA or MHA.

The grid is (query tiles of all sequences, KV heads). A tile is BLOCK_Q consecutive query tokens of one sequence
times the query heads that share the KV head (GQA: their rows share each K/V load, as in the decode kernel), so
BLOCK_M = BLOCK_Q x GROUP score rows. Sequence s owns tiles from cu_seqlens_q[s] // BLOCK_Q + s on; that bound
leaves room for each sequence's ceil(len / BLOCK_Q) tiles, so the grid is N // BLOCK_Q + B tiles, known without
reading lengths back to the host (tiles past a sequence's end return at once), and a program finds its sequence by
binary search over cu_seqlens_q.

Query token t of a sequence with len_q new of len_k tokens sits at position len_k - len_q + t and sees keys
0..that position. Key tiles wholly before the tile's first position need no mask; the rest are masked.

`launch_config` (plain Python) validates the inputs and sizes the tiles; `paged_prefill` launches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bunny_backend.ops.triton_support import MIN_DOT, check_paged_operands, next_pow2, tl, triton
from bunny_backend.ops.triton_tuning import PrefillTuning, check_tuning, prefill_tuning

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int]          # (query tiles, num_kv_heads)
    queries_per_kv: int
    group: int                     # queries_per_kv padded to a power of two
    block_q: int                   # query tokens per tile
    block_n: int                   # keys per loop iteration
    head_dim: int
    block_size: int
    num_warps: int
    num_stages: int


def launch_config(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor,
                  tuning: PrefillTuning | None = None) -> LaunchConfig:
    """q [N, H, D] packed; caches [num_blocks, block_size, Hkv, D]; block_tables int32 [B, M]; cu_seqlens_q int32
    [B+1]; seqlens_k int32 [B] (each sequence's cached + new tokens). tuning: the tile shape (None: the head size's
    row of triton_tuning.PREFILL; bench/tune_kernels.py passes others)."""
    heads, head_dim, block_size, kv_heads = check_paged_operands(q, k_cache, v_cache, "[N, H, D]")
    tokens = q.shape[0]
    if any(t.dtype != torch.int32 for t in (block_tables, cu_seqlens_q, seqlens_k)):
        raise ValueError(f"block_tables, cu_seqlens_q and seqlens_k must be int32, got {block_tables.dtype}, "
                         f"{cu_seqlens_q.dtype}, {seqlens_k.dtype}")
    batch = seqlens_k.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or cu_seqlens_q.shape != (batch + 1,):
        raise ValueError(f"block_tables must be [{batch}, M] and cu_seqlens_q [{batch + 1}]")
    rep = heads // kv_heads
    tuning = tuning or prefill_tuning(head_dim)
    check_tuning(tuning)
    rows, block_n, warps, stages = tuning.block_m, tuning.block_n, tuning.num_warps, tuning.num_stages
    group = next_pow2(rep)
    rows = max(rows, group, MIN_DOT)
    block_q = rows // group
    return LaunchConfig(grid=(tokens // block_q + batch, kv_heads), queries_per_kv=rep, group=group,
                        block_q=block_q, block_n=block_n, head_dim=head_dim, block_size=block_size,
                        num_warps=warps, num_stages=stages)


if triton is not None:
    @triton.jit
    def _tile_scores(q, k_ptr, v_ptr, tables_ptr, seq, kv_head, start, len_k, pos, scale_log2,
                     stride_cb, stride_cs, stride_ch, stride_tb, m, l, acc,
                     CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """One key tile [start, start + BLOCK_N) folded into the online softmax (m, l, acc) of the score rows."""
        keys = start + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        in_seq = keys < len_k
        block = tl.load(tables_ptr + seq * stride_tb + keys // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
        offs = block[:, None] * stride_cb + (keys % BLOCK_SIZE)[:, None] * stride_cs + kv_head * stride_ch \
            + dims[None, :]
        k = tl.load(k_ptr + offs, mask=in_seq[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=in_seq[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2                       # [BLOCK_M, BLOCK_N], log2 units
        if CAUSAL:
            s = tl.where((keys[None, :] <= pos[:, None]) & in_seq[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc

    # The batch size and the table stride change every step: no recompilation for them.
    @triton.jit(do_not_specialize=["num_seqs", "stride_tb"])
    def _paged_prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, cu_q_ptr, lens_k_ptr, scale_log2, num_seqs,
                              stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_tb,
                              QUERIES_PER_KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr,
                              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        # The sequence of this tile: the last s whose first tile cu_q[s] // BLOCK_Q + s is <= tile.
        lo = tl.program_id(0) * 0
        hi = lo + num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            starts_before = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= tile
            lo = tl.where(starts_before, mid, lo)
            hi = tl.where(starts_before, hi, mid - 1)
        seq = lo
        q_start = tl.load(cu_q_ptr + seq)
        len_q = tl.load(cu_q_ptr + seq + 1) - q_start
        first = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q          # this tile's first query token
        if first < len_q:
            len_k = tl.load(lens_k_ptr + seq)
            rows = tl.arange(0, BLOCK_Q * GROUP)
            token = first + rows // GROUP
            head = kv_head * QUERIES_PER_KV + rows % GROUP
            row_ok = (rows % GROUP < QUERIES_PER_KV) & (token < len_q)
            dims = tl.arange(0, HEAD_DIM)
            q = tl.load(q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                        mask=row_ok[:, None], other=0.0)
            pos = len_k - len_q + token                                 # each row's position in its sequence
            # -inf would make exp2(m - m_new) NaN for a row whose first tile is all masked; no row's is (every
            # row sees key `unmasked_end` or an earlier one), but a finite floor costs nothing.
            m = tl.full([BLOCK_Q * GROUP], -1.0e30, tl.float32)
            l = tl.zeros([BLOCK_Q * GROUP], tl.float32)
            acc = tl.zeros([BLOCK_Q * GROUP, HEAD_DIM], tl.float32)
            first_pos = len_k - len_q + first
            unmasked_end = first_pos // BLOCK_N * BLOCK_N             # key tiles every row sees whole
            end = tl.minimum(len_k, first_pos + BLOCK_Q)                # past the tile's last row's position
            for start in range(0, unmasked_end, BLOCK_N):
                m, l, acc = _tile_scores(q, k_ptr, v_ptr, tables_ptr, seq, kv_head, start, len_k, pos, scale_log2,
                                         stride_cb, stride_cs, stride_ch, stride_tb, m, l, acc,
                                         False, BLOCK_N, HEAD_DIM, BLOCK_SIZE)
            for start in range(unmasked_end, end, BLOCK_N):
                m, l, acc = _tile_scores(q, k_ptr, v_ptr, tables_ptr, seq, kv_head, start, len_k, pos, scale_log2,
                                         stride_cb, stride_cs, stride_ch, stride_tb, m, l, acc,
                                         True, BLOCK_N, HEAD_DIM, BLOCK_SIZE)
            out = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seqlens_k: torch.Tensor, scale: float,
                  tuning: PrefillTuning | None = None) -> torch.Tensor:
    """Causal attention of the packed queries [N, H, D] over each sequence's first seqlens_k[i] cached tokens (its
    new ones included, already stored). Padding entries of the block table (-1) are never read."""
    cfg = launch_config(q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, tuning)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    _paged_prefill_kernel[cfg.grid](out, q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k,
                                    scale * LOG2E, seqlens_k.shape[0], q.stride(0), q.stride(1), out.stride(0),
                                    out.stride(1), *k_cache.stride()[:3], block_tables.stride(0),
                                    QUERIES_PER_KV=cfg.queries_per_kv, GROUP=cfg.group, BLOCK_Q=cfg.block_q,
                                    BLOCK_N=cfg.block_n, HEAD_DIM=cfg.head_dim, BLOCK_SIZE=cfg.block_size,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
