"""Symmetric per-output-channel weight quantization (issue #30): int8 for the CPU, FP8 E4M3 for CUDA.

A weight w [out, in] becomes q [out, in] and one float32 scale per output channel, w ~ q * scale[:, None]:
int8 with scale = max|w| / 127 (round to nearest, clamped to +-127: symmetric, no -128), E4M3 with
scale = max|w| / 448 (E4M3's largest finite value). An all-zero channel gets scale 1 (its q is 0 either way), so
dequantizing never divides by zero. Rows are converted a block at a time: a float32 copy of a whole LM head
(151936 x 2048) would take 1.2 GB.
"""
from __future__ import annotations

import torch

INT8_MAX = 127
FP8_MAX = 448.0
_ROWS_PER_BLOCK = 4096


def _quantize(w: torch.Tensor, qmax: float, qdtype: torch.dtype, rounds: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if w.dim() != 2:
        raise ValueError(f"a weight to quantize must be [out_features, in_features], got shape {tuple(w.shape)}")
    q = torch.empty(w.shape, dtype=qdtype, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], _ROWS_PER_BLOCK):
        block = w[start:start + _ROWS_PER_BLOCK].float()
        amax = block.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        scaled = block / s[:, None]
        if rounds:
            scaled = scaled.round_()
        q[start:start + _ROWS_PER_BLOCK] = scaled.clamp_(-qmax, qmax).to(qdtype)
        scale[start:start + _ROWS_PER_BLOCK] = s
    return q, scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out])."""
    return _quantize(w, INT8_MAX, torch.int8, rounds=True)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [out, in], scale float32 [out]); the cast to E4M3 rounds to nearest even."""
    return _quantize(w, FP8_MAX, torch.float8_e4m3fn, rounds=False)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale per output channel, in `dtype` (the product is taken in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)
