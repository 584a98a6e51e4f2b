"""CPU weight layout for the decoder's projections.

Measured on the 2-core AVX-512 machines (bench/NOTES.md): fp32 `F.linear` streams a [5632, 1024] weight at
~21 GB/s for one row and only ~10 GB/s for 2-10 rows (MKL's small-M GEMM), while oneDNN with the weight prepacked
once (`mkldnn._reorder_linear_weight`) streams it at ~40-55 GB/s for every row count from 1 to 16, and is 2x faster
on 300-row prefills too. Where oneDNN cannot take the weight's dtype on this CPU (no oneDNN, or bf16 without
AVX512BW: its bf16 reorder raises inside oneDNN there; utils/cpu_features.py), a contiguous [in, out] weight
(`x @ W_t`) still beats `F.linear` for single rows. Layers are converted one at a time after loading, so weights
are never held twice.
"""
from __future__ import annotations

import torch
from torch import nn

from bunny_backend.utils.cpu_features import CpuFeatures, detect


class _CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return self.matmul(x)


class OneDnnLinear(_CpuLinear):
    """The weight is an opaque oneDNN-packed tensor (not an nn.Parameter: it has no strided storage)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class TransposedLinear(_CpuLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


def cpu_linear_class(dtype: torch.dtype = torch.float32, cpu: CpuFeatures | None = None) -> type[_CpuLinear]:
    """oneDNN-packed where this CPU's oneDNN takes the dtype, else the transposed layout."""
    return OneDnnLinear if (cpu or detect()).can_pack(dtype) else TransposedLinear


def use_cpu_linears(model: nn.Module, cls: type[_CpuLinear] | None = None) -> None:
    """Swap the decoder's projections (and an untied LM head) for the CPU layout, in place."""
    cls = cls or cpu_linear_class(model.model.embed_tokens.weight.dtype)
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, cls(getattr(parent, name)))
    if not model.config.text.tie_word_embeddings:
        model.lm_head = cls(model.lm_head)
