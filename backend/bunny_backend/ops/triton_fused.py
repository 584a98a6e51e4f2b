"""The decoder's elementwise work as fused Triton kernels, for CUDA: RMSNorm (with the residual add), rotary on q
and k straight out of the qkv projection, and SiLU(gate) x up. Each replaces several ATen kernels and their
temporaries (a bf16 RMSNorm alone is ~6: cast, square, mean, rsqrt, mul, cast, mul).

`TritonDecoderOps` has the interface of the C++ CPU ops (torch.ops.bunny.rms_norm, add_rms_norm, rotary_qk,
silu_mul; model/layers.py and model/qwen2.py call them through `.ops`), and rounds where the PyTorch code rounds:
each op that PyTorch runs in the tensors' dtype ends in that dtype here too, so a fused step tracks the eager one.
"""
from __future__ import annotations

import torch

from bunny_backend.ops.triton_support import next_pow2, tl, triton

ELEMENTS_PER_PROGRAM = 1024   # silu_mul's tile


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(y_ptr, sum_ptr, x_ptr, res_ptr, w_ptr, eps, n, stride_x, stride_r,
                         ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if ADD:   # the residual stream's next value, rounded to the dtype as `x + residual` is
            x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
            x = x.to(y_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * n + cols, x, mask=ok)
        xf = x.to(tl.float32)
        normed = (xf * tl.rsqrt(tl.sum(xf * xf, 0) / n + eps)).to(y_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(y_ptr + row * n + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty),
                 mask=ok)

    @triton.jit
    def _rotary_qk_kernel(q_ptr, k_ptr, qkv_ptr, cos_ptr, sin_ptr, stride_x, stride_c, stride_s,
                          NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                          HALF: tl.constexpr):
        """One token's q and k heads (the first NUM_HEADS + NUM_KV_HEADS heads of its qkv row): rotate-half,
        y1 = x1 cos1 - x2 sin1, y2 = x2 cos2 + x1 sin2, each product rounded as PyTorch rounds it."""
        row = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, HEADS_P2)
        dims = tl.arange(0, HALF)
        ok = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None]
        src = qkv_ptr + row * stride_x + heads[:, None] * (2 * HALF) + dims[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + row * stride_c + dims).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + row * stride_c + HALF + dims).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + row * stride_s + dims).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + row * stride_s + HALF + dims).to(tl.float32)[None, :]
        dt = q_ptr.dtype.element_ty
        y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
        y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
        is_q = (heads < NUM_HEADS)[:, None]
        q_dst = q_ptr + row * (NUM_HEADS * 2 * HALF) + heads[:, None] * (2 * HALF) + dims[None, :]
        tl.store(q_dst, y1, mask=is_q)
        tl.store(q_dst + HALF, y2, mask=is_q)
        is_k = ok & ~is_q
        k_dst = k_ptr + row * (NUM_KV_HEADS * 2 * HALF) + (heads - NUM_HEADS)[:, None] * (2 * HALF) + dims[None, :]
        tl.store(k_dst, y1, mask=is_k)
        tl.store(k_dst + HALF, y2, mask=is_k)

    @triton.jit
    def _silu_mul_kernel(y_ptr, gu_ptr, n, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        gate = tl.load(gu_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * stride_x + n + cols, mask=ok, other=0.0).to(tl.float32)
        dt = y_ptr.dtype.element_ty
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(y_ptr + row * n + cols, (silu * up).to(dt), mask=ok)


def _rows(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{what}: expected rows [N, features] with unit column stride, got {tuple(x.shape)} "
                         f"strides {x.stride()}")


class TritonDecoderOps:
    """The fused decoder ops on CUDA tensors (any float dtype)."""

    @staticmethod
    def _norm(x, residual, w, eps):
        _rows(x, "rms_norm")
        if w.shape != (x.shape[1],) or w.dtype != x.dtype or w.stride(0) != 1:
            raise ValueError(f"rms_norm: weight must be contiguous [{x.shape[1]}] {x.dtype}, got "
                             f"{tuple(w.shape)} {w.dtype}")
        y = torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
        total = torch.empty_like(y) if residual is not None else y
        if residual is not None:
            _rows(residual, "add_rms_norm")
            if residual.shape != x.shape or residual.dtype != x.dtype:
                raise ValueError(f"add_rms_norm: residual must match x {tuple(x.shape)} {x.dtype}, got "
                                 f"{tuple(residual.shape)} {residual.dtype}")
        if x.shape[0]:
            _rms_norm_kernel[(x.shape[0],)](y, total, x, residual if residual is not None else x, w, eps, x.shape[1],
                                            x.stride(0), (residual if residual is not None else x).stride(0),
                                            ADD=residual is not None, BLOCK=next_pow2(x.shape[1]))
        return y, total

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm(x, None, w, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        return self._norm(x, residual, w, eps)

    def rotary_qk(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q [N, H, D] and k [N, Hkv, D], contiguous, from the qkv rows [N, (H + 2 Hkv) D]."""
        _rows(qkv, "rotary_qk")
        if head_dim % 2 or not (head_dim // 2 >= 1 and next_pow2(head_dim // 2) == head_dim // 2):
            raise ValueError(f"rotary_qk: head_dim {head_dim} must be twice a power of two")
        if qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError(f"rotary_qk: qkv has {qkv.shape[1]} features, fewer than q, k and v need")
        for t in (cos, sin):
            if t.shape != (qkv.shape[0], head_dim) or t.dtype != qkv.dtype or t.stride(1) != 1:
                raise ValueError(f"rotary_qk: cos and sin must be [{qkv.shape[0]}, {head_dim}] {qkv.dtype}, got "
                                 f"{tuple(t.shape)} {t.dtype}")
        n = qkv.shape[0]
        q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        if n:
            _rotary_qk_kernel[(n,)](q, k, qkv, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0),
                                    NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
                                    HEADS_P2=next_pow2(num_heads + num_kv_heads), HALF=head_dim // 2)
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of rows [N, 2I] = [gate | up]: [N, I]."""
        _rows(gate_up, "silu_mul")
        if gate_up.shape[1] % 2:
            raise ValueError(f"silu_mul: gate_up must have an even number of features, got {gate_up.shape[1]}")
        n, inter = gate_up.shape[0], gate_up.shape[1] // 2
        y = torch.empty((n, inter), dtype=gate_up.dtype, device=gate_up.device)
        if n:
            _silu_mul_kernel[(n, triton.cdiv(inter, ELEMENTS_PER_PROGRAM))](y, gate_up, inter, gate_up.stride(0),
                                                                          BLOCK=ELEMENTS_PER_PROGRAM)
        return y


def decoder_ops() -> TritonDecoderOps | None:
    """The fused ops, or None without triton."""
    return TritonDecoderOps() if triton is not None else None
