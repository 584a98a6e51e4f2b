"""Paged attention on Ascend NPUs through torch_npu's ATB ops, called as vllm-project/vllm-ascend calls them
(vllm_ascend/attention/attention_v1.py; signatures in Ascend/op-plugin op_plugin/ops/atb/*.cpp):

- store:                    _npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)
- prefill, no cached prefix: _npu_flash_attention(query, key, value, mask, seq_len, scale_value, num_heads,
                            num_kv_heads, out)                        (vllm-ascend: _forward_prefill_no_cache)
- prefill over a cached prefix (chunked prefill, prefix-cache hits):
                            _npu_flash_attention_qlens(query, key_cache, value_cache, block_table, mask, seq_len,
                            context_lens, num_kv_heads, num_heads, scale_value, out)   (_forward_prefill_cache_hit)
- decode:                   _npu_paged_attention(query, key_cache, value_cache, num_kv_heads, num_heads,
                            scale_value, block_table, context_lens, out)               (_forward_decode_only)

A mixed step (decode rows and prefill chunks) reaches this backend split in two by ops.attention.attend: its
decode rows through _npu_paged_attention, its prefill chunks through _npu_flash_attention_qlens (or
_npu_flash_attention when no chunk has a cached prefix). `prefill` itself also takes the whole mixed batch
(a decode row is a one-token chunk over its cache) through _npu_flash_attention_qlens.

Cache layout [num_blocks, block_size, num_kv_heads, head_dim] (vllm-ascend get_kv_cache_shape, non-310P).
slot_indices and block tables are int32 on the device; seq_len and context_lens are int32 host tensors, built
from the context's host lists so no device->host sync is needed. The ops' contract is written down, and enforced,
in npu_emulator.py; `python -m bunny_backend.tools.check_npu_ops` checks the real ops against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bunny_backend.utils.context import ForwardContext

COMPRESSED_MASK_SIZE = 128   # _npu_flash_attention_qlens takes a fixed 128x128 causal tile (MASK_TYPE_NORM_COMPRESS)


def causal_mask(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The ATB causal mask (vllm_ascend/attention/attention_mask.py `_generate_attn_mask`): above the diagonal
    float32.min for float16 (and the emulator's float32), 1 for bfloat16 (the bf16 kernel reads it as a flag)."""
    upper = torch.ones(size, size, dtype=torch.bool, device=device).triu(1)
    value = 1.0 if dtype == torch.bfloat16 else torch.finfo(torch.float32).min
    return torch.zeros(size, size, device=device).masked_fill(upper, value).to(dtype)


@dataclass
class _StepMeta:
    ctx: ForwardContext
    seq_len: torch.Tensor | None = None        # int32 host [B]: new tokens per sequence
    context_lens: torch.Tensor | None = None   # int32 host [B]: cached + new tokens
    block_tables: torch.Tensor | None = None   # int32 device [B, M], -1 padding replaced by block 0
    mask: torch.Tensor | None = None           # the causal mask cut to this step's longest prefill, contiguous


class NpuAttentionBackend:
    """Holds one causal mask at the largest prefill size (max_query_tokens; the engine's
    min(max_num_batched_tokens, max_model_len)) and cuts each prefill step's [n, n] from it, as vllm-ascend's
    AttentionMaskBuilder does; `workspace_bytes` tells the KV memory plan what that costs."""
    name = "npu"

    def __init__(self, max_query_tokens: int = 0):
        import torch_npu   # lazily: registers the "npu" device; the emulator stands in for it in tests
        self.ops = torch_npu
        self.max_query_tokens = max_query_tokens   # 0: the mask grows to the longest prefill seen (tools, tests)
        self.causal_mask: torch.Tensor | None = None
        self._compressed_mask: torch.Tensor | None = None
        self._metas: list[_StepMeta] = []   # the latest step's: two for a mixed step (decodes, prefills)
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None

    def workspace_bytes(self, dtype) -> int:
        """The mask, the step's contiguous cut of it (at most as large) and the 128x128 tile."""
        elem = torch.empty((), dtype=dtype).element_size()
        return (2 * self.max_query_tokens ** 2 + COMPRESSED_MASK_SIZE ** 2) * elem

    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        device = torch.device(device)
        if device.type == "npu" and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the NPU attention ops take float16 or bfloat16, not {dtype}; set dtype=bfloat16")
        if block_size % 16 or block_size * head_dim > 128 * 128:
            raise ValueError(f"NPU paged attention needs block_size % 16 == 0 and block_size * head_dim <= 16384; "
                             f"got block_size={block_size}, head_dim={head_dim} (128 is the usual block size)")
        if self.max_query_tokens and self.causal_mask is None:   # taken with the cache, not at the first request
            self.causal_mask = causal_mask(self.max_query_tokens, dtype, device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    # ---- per-step metadata, computed once and shared by every layer ---------------------------------------
    def _step(self, ctx: ForwardContext) -> _StepMeta:
        meta = next((m for m in self._metas if m.ctx is ctx), None)
        if meta is None:
            meta = _StepMeta(ctx)
            lens_k = ctx.seqlens_k if ctx.seqlens_k is not None else ctx.context_lens.tolist()
            meta.context_lens = torch.tensor(lens_k, dtype=torch.int32)
            if ctx.seqlens_q is not None:
                meta.seq_len = torch.tensor(ctx.seqlens_q, dtype=torch.int32)
            if ctx.block_tables is not None:
                meta.block_tables = ctx.block_tables.to(torch.int32).clamp_min(0).contiguous()
            self._metas = self._metas[-1:] + [meta]
        return meta

    def _slot_indices(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        if self._slots is None or self._slots[0] is not slot_mapping:
            self._slots = (slot_mapping, slot_mapping.to(torch.int32))
        return self._slots[1]

    def _step_mask(self, meta: _StepMeta, like: torch.Tensor) -> torch.Tensor:
        """[n, n] for the step's longest prefill n, cut once per step from the one held mask."""
        if meta.mask is None:
            n = max(meta.ctx.seqlens_q)
            if self.max_query_tokens and n > self.max_query_tokens:
                raise ValueError(f"a prefill of {n} new tokens is longer than the {self.max_query_tokens} the NPU "
                                 "causal mask was built for (max_num_batched_tokens)")
            mask = self.causal_mask
            if mask is None or mask.shape[0] < n or mask.dtype != like.dtype or mask.device != like.device:
                mask = self.causal_mask = causal_mask(max(n, self.max_query_tokens), like.dtype, like.device)
            meta.mask = mask if mask.shape[0] == n else mask[:n, :n].contiguous()
        return meta.mask

    def _compressed(self, like: torch.Tensor) -> torch.Tensor:
        mask = self._compressed_mask
        if mask is None or mask.dtype != like.dtype or mask.device != like.device:
            mask = self._compressed_mask = causal_mask(COMPRESSED_MASK_SIZE, like.dtype, like.device)
        return mask

    # ---- the AttentionBackend interface ---------------------------------------------------------------------
    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self.ops._npu_reshape_and_cache(key=k, value=v, key_cache=k_cache, value_cache=v_cache,
                                        slot_indices=self._slot_indices(slot_mapping))

    def prefill(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale):
        meta = self._step(ctx)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        if k_cache is None or ctx.seqlens_k == ctx.seqlens_q:
            self.ops._npu_flash_attention(query=q, key=k, value=v, mask=self._step_mask(meta, q),
                                          seq_len=meta.seq_len, scale_value=scale, num_heads=num_heads,
                                          num_kv_heads=num_kv_heads, out=out)
        else:
            # store_kv already wrote this chunk, so the cache holds each sequence's whole context
            self.ops._npu_flash_attention_qlens(query=q, key_cache=k_cache, value_cache=v_cache,
                                                block_table=meta.block_tables,
                                                mask=self._compressed(q), seq_len=meta.seq_len,
                                                context_lens=meta.context_lens, num_kv_heads=num_kv_heads,
                                                num_heads=num_heads, scale_value=scale, out=out)
        return out

    def decode(self, q, k_cache, v_cache, ctx: ForwardContext, scale):
        meta = self._step(ctx)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.ops._npu_paged_attention(query=q, key_cache=k_cache, value_cache=v_cache, num_kv_heads=k_cache.shape[2],
                                      num_heads=q.shape[1], scale_value=scale, block_table=meta.block_tables,
                                      context_lens=meta.context_lens, out=out)
        return out
