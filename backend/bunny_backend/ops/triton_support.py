"""What the Triton-lang kernels (paged decode, varlen prefill, fused elementwise ops) have in common: the optional
import of triton, and the one rule for which tensors the attention kernels take. Only the CUDA path imports
this module's kernels' users; without triton, `triton` is None and the CUDA backend runs the portable code."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

MIN_DOT = 16   # tl.dot needs every tile dimension >= 16
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def attention_unsupported_for(dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """Why the attention kernels cannot take this dtype / head dim / block size (the backend then falls back), or
    None."""
    if triton is None:
        return "triton is not installed"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (the kernel takes float16/bfloat16)"
    if not (pow2(head_dim) and head_dim >= MIN_DOT and pow2(block_size) and block_size >= MIN_DOT):
        return f"head_dim {head_dim} / block_size {block_size} must be powers of two >= {MIN_DOT}"
    return None


def check_paged_operands(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         q_shape: str) -> tuple[int, int, int, int]:
    """q (3-D, described as `q_shape` in messages) and the paged caches [num_blocks, block_size, Hkv, D] as the
    attention kernels take them: (heads, head_dim, block_size, kv_heads), or ValueError naming the mismatch."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q {q_shape} and caches [blocks, block_size, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or heads % kv_heads:
        raise ValueError(f"q has {heads} heads of {head_dim}, caches {kv_heads} KV heads of {cache_dim}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("q and the caches need a unit stride on head_dim and K/V caches the same strides")
    return heads, head_dim, block_size, kv_heads
