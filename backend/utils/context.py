"""Attention metadata for one forward pass, set by the model runner and read by every attention layer.

Tokens of all sequences in a step are packed along one axis (no padding). Prefill: sequence i owns query rows
cu_seqlens_q[i]:cu_seqlens_q[i+1] and attends causally over its first seqlens_k[i] cached tokens (cached prefix +
these new ones). Decode: one query row per sequence over context_lens[i] tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    is_prefill: bool = True
    cu_seqlens_q: torch.Tensor | None = None   # int32 [B+1]
    max_seqlen_q: int = 0
    slot_mapping: torch.Tensor | None = None   # int64 [N]: cache slot of each new token (see token_slots)
    context_lens: torch.Tensor | None = None   # int32 [B]: tokens in cache after this step, per sequence
    block_tables: torch.Tensor | None = None   # int32 [B, max_blocks], -1 padded
    # Host copies so that portable kernels need no device->host syncs.
    seqlens_q: list[int] | None = None
    seqlens_k: list[int] | None = None


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
