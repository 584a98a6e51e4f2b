"""Attention metadata for one forward pass, set by the model runner and read by every attention layer.

Tokens of all sequences in a step are packed along one axis (no padding). Prefill: sequence i owns query rows
cu_seqlens_q[i]:cu_seqlens_q[i+1] and attends causally over its first cu_seqlens_k[i+1]-cu_seqlens_k[i] cached
tokens (cached prefix + these new ones). Decode: one query row per sequence over context_lens[i] tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    is_prefill: bool = True
    cu_seqlens_q: torch.Tensor | None = None   # int32 [B+1]
    cu_seqlens_k: torch.Tensor | None = None   # int32 [B+1]
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None   # int64 [N]: cache slot (block * block_size + offset) of each new token
    context_lens: torch.Tensor | None = None   # int32 [B]: tokens in cache after this step, per sequence
    block_tables: torch.Tensor | None = None   # int32 [B, max_blocks], -1 padded
    # Host copies so that portable kernels need no device->host syncs.
    seqlens_q: list[int] | None = None
    seqlens_k: list[int] | None = None


_CONTEXT = ForwardContext()


def get_context() -> ForwardContext:
    return _CONTEXT


def set_context(ctx: ForwardContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(ForwardContext())


def dense_prefill_context(seqlens: list[int], device: torch.device | str = "cpu") -> ForwardContext:
    """Context for a cache-less causal forward over packed sequences (used by tests and the vision-free path)."""
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return ForwardContext(is_prefill=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(seqlens),
                          max_seqlen_k=max(seqlens), seqlens_q=list(seqlens), seqlens_k=list(seqlens))
