"""Building blocks shared by the decoder: RMSNorm, rotary embedding, and the paged attention call."""
from __future__ import annotations

import torch
from torch import nn

from bunny_backend.ops.attention import attend
from bunny_backend.utils.context import get_context


class RMSNorm(nn.Module):
    """`ops`: the fused decoder ops where they run it (Qwen2Model.use_fused_ops), else None."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's next value and its normalised form."""
        if self.ops is not None:
            return self.ops.add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self.forward(residual), residual


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [N, head_dim] for the rotate-half convention (computed in fp32 as transformers does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos/sin [N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    """Paged attention over the current ForwardContext. The model runner sets `k_cache`, `v_cache` and
    `backend`; with no cache it is plain causal attention over the packed sequences."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            from bunny_backend.ops.attention_torch import TorchAttentionBackend
            self.backend = TorchAttentionBackend()
        ctx = get_context()
        if self.k_cache is not None and ctx.slot_mapping is not None:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return attend(self.backend, q, k, v, self.k_cache, self.v_cache, ctx, self.scale)

    def forward_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Stores every row's K/V; attends for `rows` only, the context's output rows: each its sequence's
        last token so far, which makes it one decode over that sequence's cache (ctx.outputs)."""
        ctx = get_context()
        self.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if rows.numel() == 0:
            return q.new_empty((0, self.num_heads, self.head_dim))
        return self.backend.decode(q.index_select(0, rows), self.k_cache, self.v_cache, ctx.outputs, self.scale)
