"""y = x @ (q * scale)^T + bias over int8 weights with one scale per output channel (ops/weight_quant.py): the
portable path, for any CPU (and any device torch runs).

The weight is turned into x's dtype a block of output channels at a time and multiplied unscaled (the integers
up to 127 are exact in bfloat16 and float16); the block's outputs are then scaled in float32, so the scale is never
rounded to x's dtype. The block (256 channels: 512 KB in bf16 at 1024 inputs) stays in L2 between the conversion and
the matmul. torch's own `aten._weight_int8pack_mm` is not used: in torch 2.13 it reads its activations as
contiguous (row-strided ones crashed the process), crashes for in_features 67 and gives wrong outputs for 72.
"""
from __future__ import annotations

import torch

CHANNELS_PER_BLOCK = 256


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (any strides), q int8 [N, K], scale float32 [N], bias [N] or None -> [M, N] in x's dtype."""
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"int8_linear: x {tuple(x.shape)} and weight {tuple(q.shape)} do not match")
    n = q.shape[0]
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for start in range(0, n, CHANNELS_PER_BLOCK):
        stop = min(start + CHANNELS_PER_BLOCK, n)
        partial = torch.mm(x, q[start:stop].to(x.dtype).t()).float() * scale[start:stop]
        if bias is not None:
            partial += bias[start:stop].float()
        out[:, start:stop] = partial
    return out
