"""The attention backend interface: the only place that knows how the paged KV cache is laid out.

A backend is one file implementing `AttentionBackend`; the model calls it through `layers.Attention` and never
sees block tables. Cache layout is the backend's choice (the portable and NPU ones use
[num_blocks, block_size, num_kv_heads, head_dim] per layer for K and for V).
"""
from __future__ import annotations

from typing import Protocol

import torch

from bunny_backend.utils.context import ForwardContext


class AttentionBackend(Protocol):
    name: str

    def allocate_kv_cache(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's (k_cache, v_cache)."""

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Write new K/V rows [N, Hkv, D] into their slots."""

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, ctx: ForwardContext, scale: float) -> torch.Tensor:
        """Causal attention of packed queries [N, H, D] over each sequence's cached prefix plus its new tokens,
        any number (>= 1) of new tokens per sequence: a mixed batch of decode rows and prefill chunks is valid.
        With no cache (k_cache is None) the new k/v are the whole context."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
               scale: float) -> torch.Tensor:
        """One query row per sequence [B, H, D] over its context_lens[i] cached tokens."""

    def workspace_bytes(self, dtype: torch.dtype) -> int:
        """Device memory the backend holds besides the KV cache; the engine's KV memory plan counts it."""


def attend(backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
           v_cache: torch.Tensor | None, ctx: ForwardContext, scale: float) -> torch.Tensor:
    """One layer's attention for the step `ctx` describes (the new K/V already stored): a decode step, a prefill
    step, or a mixed step, whose leading decode rows run as one batched decode and its prefill chunks as a prefill."""
    if not ctx.is_prefill:
        return backend.decode(q, k_cache, v_cache, ctx, scale)
    if ctx.decodes is None or k_cache is None:
        return backend.prefill(q, k, v, k_cache, v_cache, ctx, scale)
    n = len(ctx.decodes.seqlens_k)
    return torch.cat([backend.decode(q[:n], k_cache, v_cache, ctx.decodes, scale),
                      backend.prefill(q[n:], k[n:], v[n:], k_cache, v_cache, ctx.prefills, scale)])


def get_backend(name: str, max_query_tokens: int = 0) -> AttentionBackend:
    """`name`: torch, cuda or npu (a device type picks its own backend; cpu means torch). `max_query_tokens`: the
    most new tokens one sequence brings to a step (0: not known; backends that size buffers by it then grow them)."""
    if name == "npu":
        from bunny_backend.ops.attention_npu import NpuAttentionBackend
        return NpuAttentionBackend(max_query_tokens)
    if name == "cuda":
        from bunny_backend.ops.attention_cuda import CudaAttentionBackend
        return CudaAttentionBackend()
    from bunny_backend.ops.attention_torch import TorchAttentionBackend
    return TorchAttentionBackend()
