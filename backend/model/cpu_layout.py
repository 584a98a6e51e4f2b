"""CPU weight layout: decoder linears stored transposed ([in, out], contiguous).

On x86 CPUs with MKL, `x @ W_t` with a contiguous [in, out] weight streams the weight faster than `F.linear`'s
`x @ W.T` for the small row counts of decode (measured in bench/NOTES.md). Converted one layer at a time after
loading, so the weights are never held twice.
"""
from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


def use_transposed_linears(model: nn.Module) -> None:
    """Swap the decoder's projections (and an untied LM head) for TransposedLinear, in place."""
    tied = model.config.text.tie_word_embeddings
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, TransposedLinear(getattr(parent, name)))
    if not tied:
        model.lm_head = TransposedLinear(model.lm_head)
