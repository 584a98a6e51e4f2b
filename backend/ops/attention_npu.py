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


class NpuAttentionBackend:
    name = "npu"

    def __init__(self):
        import torch_npu   # lazily: registers the "npu" device; the emulator stands in for it in tests
        self.ops = torch_npu
        self._meta: _StepMeta | None = None
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._masks: dict[tuple, torch.Tensor] = {}

    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        device = torch.device(device)
        if device.type == "npu" and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the NPU attention ops take float16 or bfloat16, not {dtype}; set dtype=bfloat16")
        if block_size % 16 or block_size * head_dim > 128 * 128:
            raise ValueError(f"NPU paged attention needs block_size % 16 == 0 and block_size * head_dim <= 16384; "
                             f"got block_size={block_size}, head_dim={head_dim} (128 is the usual block size)")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    # ---- per-step metadata, computed once and shared by every layer ---------------------------------------
    def _step(self, ctx: ForwardContext) -> _StepMeta:
        if self._meta is None or self._meta.ctx is not ctx:
            meta = _StepMeta(ctx)
            lens_k = ctx.seqlens_k if ctx.seqlens_k is not None else ctx.context_lens.tolist()
            meta.context_lens = torch.tensor(lens_k, dtype=torch.int32)
            if ctx.seqlens_q is not None:
                meta.seq_len = torch.tensor(ctx.seqlens_q, dtype=torch.int32)
            if ctx.block_tables is not None:
                meta.block_tables = ctx.block_tables.to(torch.int32).clamp_min(0).contiguous()
            self._meta = meta
        return self._meta

    def _slot_indices(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        if self._slots is None or self._slots[0] is not slot_mapping:
            self._slots = (slot_mapping, slot_mapping.to(torch.int32))
        return self._slots[1]

    def _mask(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.dtype, like.device)
        if key not in self._masks:
            if len(self._masks) > 64:      # prefill lengths vary; keep the cache bounded
                self._masks.clear()
            self._masks[key] = causal_mask(size, like.dtype, like.device)
        return self._masks[key]

    # ---- the AttentionBackend interface ---------------------------------------------------------------------
    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self.ops._npu_reshape_and_cache(key=k, value=v, key_cache=k_cache, value_cache=v_cache,
                                        slot_indices=self._slot_indices(slot_mapping))

    def prefill(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale):
        meta = self._step(ctx)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        if k_cache is None or ctx.seqlens_k == ctx.seqlens_q:
            self.ops._npu_flash_attention(query=q, key=k, value=v, mask=self._mask(max(ctx.seqlens_q), q),
                                          seq_len=meta.seq_len, scale_value=scale, num_heads=num_heads,
                                          num_kv_heads=num_kv_heads, out=out)
        else:
            # store_kv already wrote this chunk, so the cache holds each sequence's whole context
            self.ops._npu_flash_attention_qlens(query=q, key_cache=k_cache, value_cache=v_cache,
                                                block_table=meta.block_tables,
                                                mask=self._mask(COMPRESSED_MASK_SIZE, q), seq_len=meta.seq_len,
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
