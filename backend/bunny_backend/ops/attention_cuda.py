"""Paged attention on CUDA GPUs. Same cache layout as the portable backend ([num_blocks, block_size, Hkv, D]);
what changes is the kernels:
- store: index_copy_ into the flattened cache (one fused scatter per tensor; inherited);
- prefill without a cached prefix (outside a graph: whether a step has one is a host fact): flash_attn_varlen_func over the packed sequences when the flash_attn package
  is installed (float16/bfloat16);
- every other prefill (cached prefixes, continuing chunks, one-token queries, and fresh prompts without
  flash-attn): one Triton launch over the paged cache for the whole batch (triton_prefill.py); flash-attn's paged
  prefill wants blocks of 256 tokens, more than our default 16;
- decode: a Triton kernel that reads K/V through the block table (triton_paged_decode.py).
Where triton or the tensors' dtype/shape rule it out, the portable code runs (logged once).
A mixed step arrives split (ops.attention.attend): its decode rows through `decode`, its prefill chunks through
`prefill`; given a whole mixed batch, `prefill` takes it too.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from bunny_backend.ops import triton_paged_decode, triton_prefill
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.utils.context import ForwardContext

log = logging.getLogger(__name__)


def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:   # installed but built for another torch/CUDA
        log.warning("flash_attn is installed but does not import (%s); prefill uses SDPA", e)
        return None
    return flash_attn_varlen_func


class CudaAttentionBackend(TorchAttentionBackend):
    name = "cuda"

    def __init__(self):
        self.flash_varlen = _flash_attn_varlen()
        self._fallback_logged: set[str] = set()

    def _note_fallback(self, what: str, reason: str) -> None:
        if what not in self._fallback_logged:
            self._fallback_logged.add(what)
            log.info("cuda attention: %s uses the portable code: %s", what, reason)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale):
        no_prefix = k_cache is None or ctx.seqlens_k == ctx.seqlens_q
        if (no_prefix and not ctx.in_graph and self.flash_varlen is not None and ctx.cu_seqlens_q is not None
                and q.dtype in (torch.float16, torch.bfloat16)):
            cu = ctx.cu_seqlens_q
            return self.flash_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=ctx.max_seqlen_q,
                                     max_seqlen_k=ctx.max_seqlen_q, softmax_scale=scale, causal=True)
        if k_cache is not None:
            reason = triton_paged_decode.unsupported_reason(q, k_cache)
            if reason is None:
                return triton_prefill.paged_prefill(q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q,
                                                    ctx.context_lens, scale)
            self._note_fallback("prefill", reason)
        return super().prefill(q, k, v, k_cache, v_cache, ctx, scale)

    def decode(self, q, k_cache, v_cache, ctx: ForwardContext, scale):
        reason = triton_paged_decode.unsupported_reason(q, k_cache)
        if reason is None:
            return triton_paged_decode.paged_decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        self._note_fallback("decode", reason)
        return super().decode(q, k_cache, v_cache, ctx, scale)
