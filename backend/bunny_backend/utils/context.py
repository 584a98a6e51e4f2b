"""Attention metadata for one forward pass, set by the model runner and read by every attention layer.

Tokens of all sequences in a step are packed along one axis (no padding). Prefill (varlen): sequence i owns query
rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and attends causally over its first seqlens_k[i] cached tokens (cached
prefix + these new ones); any query length >= 1, so this form also describes decode rows. Decode: one query row
per sequence over context_lens[i] tokens.

A mixed step (decode rows and prefill chunks in one forward) is a varlen prefill context over the whole batch,
decodes first, that also carries the same batch split in two: `decodes`, a decode context over the first
sequences (rows 0..n-1), and `prefills`, a varlen context over the rest. ops.attention.attend runs the two parts
with the backend's decode and prefill kernels; the top-level fields stay a complete description of the batch.

A step captured in a graph (engine/worker/mixed_graphs.py) is one varlen context over padded tokens and sequences,
decode rows included as one-token queries, with no `decodes`/`prefills` split (in_graph).

A prefill or mixed step also names the rows whose final hidden states make logits (`output_rows`: each the last
token of a sequence whose prompt ends in this step, or a decode row) and carries a decode context over their
sequences (`outputs`). The last decoder layer stores K/V for every row but computes the rest for those rows only
(model/qwen2.py): nothing reads the other rows' output.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    is_prefill: bool = True
    cu_seqlens_q: torch.Tensor | None = None   # int32 [B+1]
    max_seqlen_q: int = 0
    slot_mapping: torch.Tensor | None = None   # int64 [N]: cache slot of each new token (see token_slots)
    context_lens: torch.Tensor | None = None   # int32 [B]: tokens in cache after this step, per sequence (seqlens_k)
    block_tables: torch.Tensor | None = None   # int32 [B, max_blocks], -1 padded
    # Host copies so that portable kernels need no device->host syncs.
    seqlens_q: list[int] | None = None
    seqlens_k: list[int] | None = None
    # A mixed step only (see the module docstring).
    decodes: ForwardContext | None = None
    prefills: ForwardContext | None = None
    # A prefill or mixed step (see the module docstring): ascending row indices, and a decode context over their
    # sequences (None when no row makes logits).
    output_rows: torch.Tensor | None = None    # int64 [M]
    outputs: ForwardContext | None = None
    # Captured in a CUDA graph (decode_graphs.py, mixed_graphs.py): a backend may use only the device tensors (their
    # shapes are the graph's; the host lists, kept for portable kernels, change every replay) and no host lengths.
    in_graph: bool = False


def token_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions [start, end) of a sequence: block * block_size + offset in the block."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


_CONTEXT = ForwardContext()


def get_context() -> ForwardContext:
    return _CONTEXT


def set_context(ctx: ForwardContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(ForwardContext())


def block_table_tensor(tables: list[list[int]], device) -> torch.Tensor:
    """Block-table lists as the int32 tensor the kernels read, -1 past each sequence's blocks."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)


def _varlen(seqlens_q: list[int], seqlens_k: list[int], tables: torch.Tensor, slot_mapping, device):
    cu_q = torch.tensor([0] + seqlens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return ForwardContext(is_prefill=True, cu_seqlens_q=cu_q.to(device), max_seqlen_q=max(seqlens_q),
                          slot_mapping=slot_mapping, block_tables=tables,
                          context_lens=torch.tensor(seqlens_k, dtype=torch.int32, device=device),
                          seqlens_q=list(seqlens_q), seqlens_k=list(seqlens_k))


def _decode(seqlens_k: list[int], tables: torch.Tensor, slot_mapping, device):
    return ForwardContext(is_prefill=False, slot_mapping=slot_mapping,
                          context_lens=torch.tensor(seqlens_k, dtype=torch.int32, device=device),
                          block_tables=tables, seqlens_k=list(seqlens_k))


def paged_context(seqlens_q: list[int], seqlens_k: list[int], block_tables: list[list[int]] | torch.Tensor,
                  slot_mapping: torch.Tensor, num_decodes: int = 0, finals: list[bool] | None = None) -> ForwardContext:
    """The context of one step over the paged cache, on slot_mapping's device. Sequence i computes its last
    seqlens_q[i] of seqlens_k[i] tokens, whose cache slots are slot_mapping's rows in order; its blocks are
    block_tables[i] (lists, or their int32 tensor [n, width] on the device as block_table_tensor makes it). The
    first num_decodes sequences decode one token each: all of them make a decode context, some of them a mixed
    one (see the module docstring), none a varlen prefill context. finals[i]: sequence i's
    last new row makes logits (a decode, or the end of its prompt); given, a prefill or mixed step carries
    `output_rows` and `outputs` for them."""
    n, device = len(seqlens_q), slot_mapping.device
    if any(q != 1 for q in seqlens_q[:num_decodes]):
        raise ValueError(f"the first {num_decodes} sequences must decode one token each, got {seqlens_q}")
    if not isinstance(block_tables, torch.Tensor):
        block_tables = block_table_tensor(block_tables, device)
    if block_tables.shape[0] != n:
        raise ValueError(f"{n} sequences but {block_tables.shape[0]} block-table rows")
    if num_decodes == n:
        return _decode(seqlens_k, block_tables, slot_mapping, device)
    ctx = _varlen(seqlens_q, seqlens_k, block_tables, slot_mapping, device)
    if num_decodes:
        ctx.decodes = _decode(seqlens_k[:num_decodes], block_tables[:num_decodes], slot_mapping[:num_decodes], device)
        ctx.prefills = _varlen(seqlens_q[num_decodes:], seqlens_k[num_decodes:], block_tables[num_decodes:],
                               slot_mapping[num_decodes:], device)
    if finals is not None:
        ends = list(itertools.accumulate(seqlens_q))
        picked = [i for i in range(n) if finals[i]]
        rows = [ends[i] - 1 for i in picked]
        ctx.output_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        if picked:
            tables = block_tables if len(picked) == n else block_tables[torch.tensor(picked, device=device)]
            ctx.outputs = _decode([seqlens_k[i] for i in picked], tables, slot_mapping[ctx.output_rows], device)
    return ctx
