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
