"""A stand-in `torch_npu` for machines without an Ascend NPU: the four ATB ops the NPU backend calls, written in
plain torch with the real bindings' argument names and order, and strict about what the real ops require.

Contract, from Ascend/op-plugin (op_plugin/ops/atb/{ReshapeAndCachAtb,SelfAttentionAtb,SelfAttentionQlensAtb,
PagedAttentionAtb}.cpp), the ATB PagedAttentionOperation docs, and how vllm-project/vllm-ascend calls them
(vllm_ascend/attention/attention_v1.py, vllm_ascend/attention/attention_mask.py):
- caches are [num_blocks, block_size, num_kv_heads, head_dim], contiguous (ATB refuses non-contiguous outputs,
  op_plugin/utils/custom_functions/atb/AtbCommon.cpp); block_size % 16 == 0, block_size * head_dim <= 128 * 128;
- slot_indices and block tables are int32 on the device; block table entries must lie in [0, num_blocks);
- seq_len / context_lens are int32 host (CPU) tensors: ATB reads CPU tensors as hostData (AtbCommon.cpp);
- causal masks: float16 uses float32.min (-inf once cast) above the diagonal, bfloat16 uses 1 there
  (attention_mask.py `_generate_attn_mask`); _npu_flash_attention takes [max_seq_len, max_seq_len], the
  "compressed" mask of _npu_flash_attention_qlens is always [128, 128].
Everything is computed in float32. float32 inputs are refused like on the NPU unless `allow_float32` (engine
tests on CPU run the model in float32).
"""
from __future__ import annotations

import sys
import types
from collections import Counter

import torch

from bunny_backend.ops.attention_npu import COMPRESSED_MASK_SIZE


class NpuOpContractError(ValueError):
    """A call that the real op would reject (or silently miscompute)."""


def _require(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise NpuOpContractError(f"{op}: {msg}")


class EmulatedTorchNpu(types.ModuleType):
    def __init__(self, allow_float32: bool = True):
        super().__init__("torch_npu", "bunny_backend.ops.npu_emulator: plain-torch stand-in for torch_npu")
        self.allow_float32 = allow_float32
        self.calls: Counter[str] = Counter()   # op name -> times called (tests check which path ran)
        self.__file__ = __file__

    # ---- checks --------------------------------------------------------------------------------------------
    def _dtypes(self, op, *tensors):
        allowed = (torch.float16, torch.bfloat16) + ((torch.float32,) if self.allow_float32 else ())
        dtype = tensors[0].dtype
        _require(dtype in allowed, op, f"dtype {dtype} is not supported (takes {allowed})")
        for t in tensors:
            _require(t.dtype == dtype, op, f"mixed dtypes {dtype} and {t.dtype}")
            _require(t.device == tensors[0].device, op, f"tensors on {tensors[0].device} and {t.device}")

    def _cache(self, op, name, cache, num_kv_heads, head_dim):
        _require(cache.dim() == 4, op, f"{name} must be 4-D [num_blocks, block_size, num_kv_heads, head_dim], "
                                       f"got shape {tuple(cache.shape)}")
        _require(cache.is_contiguous(), op, f"{name} must be contiguous")
        nb, bs, h, d = cache.shape
        if (h, d) != (num_kv_heads, head_dim):
            hint = " (looks like [num_blocks, num_kv_heads, block_size, head_dim])" if bs == num_kv_heads else ""
            raise NpuOpContractError(
                f"{op}: {name} must be [num_blocks, block_size, num_kv_heads={num_kv_heads}, head_dim={head_dim}], "
                f"got {tuple(cache.shape)}{hint}")
        _require(bs % 16 == 0, op, f"block_size must be a multiple of 16, got {bs}")
        _require(bs * d <= 128 * 128, op, f"block_size * head_dim must be <= 16384, got {bs}*{d}")
        _require(0 < d <= 256, op, f"head_dim must be in (0, 256], got {d}")

    def _heads(self, op, query, num_heads, num_kv_heads):
        _require(query.dim() == 3 and query.shape[1] == num_heads, op,
                 f"query must be [tokens, num_heads={num_heads}, head_dim], got {tuple(query.shape)}")
        _require(num_kv_heads > 0 and num_heads % num_kv_heads == 0, op,
                 f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")

    def _host_lens(self, op, name, t, batch=None):
        _require(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1, op,
                 f"{name} must be a 1-D int32 tensor, got {getattr(t, 'dtype', type(t))}")
        _require(t.device.type == "cpu", op, f"{name} must be a host (CPU) tensor, got {t.device}")
        _require(batch is None or t.numel() == batch, op, f"{name} has {t.numel()} entries for {batch} sequences")
        _require(bool((t > 0).all()), op, f"{name} entries must be > 0")

    def _block_table(self, op, table, batch, cache, context_lens, device):
        _require(table.dtype == torch.int32, op, f"block_table must be int32, got {table.dtype}")
        _require(table.device == device, op, f"block_table must be on {device}, got {table.device}")
        _require(table.dim() == 2 and table.shape[0] == batch, op,
                 f"block_table must be [{batch}, max_blocks], got {tuple(table.shape)}")
        nb, bs = cache.shape[:2]
        _require(bool(((table >= 0) & (table < nb)).all()), op,
                 f"block_table entries must lie in [0, {nb}) (pad with a valid block, not -1)")
        _require(table.shape[1] * bs >= int(context_lens.max()), op,
                 f"block_table of width {table.shape[1]} cannot hold {int(context_lens.max())} tokens")

    def _out(self, op, out, like):
        _require(out.shape == like.shape and out.dtype == like.dtype and out.device == like.device, op,
                 f"out must match query ({tuple(like.shape)}, {like.dtype}), got ({tuple(out.shape)}, {out.dtype})")
        _require(out.is_contiguous(), op, "out must be contiguous")

    def _causal_mask(self, op, mask, dtype, size=None):
        _require(mask.dim() == 2 and mask.shape[0] == mask.shape[1], op,
                 f"mask must be square 2-D, got {tuple(mask.shape)}")
        _require(size is None or mask.shape[0] == size, op, f"mask must be [{size}, {size}], got {tuple(mask.shape)}")
        _require(mask.dtype == dtype, op, f"mask dtype {mask.dtype} must match query dtype {dtype}")
        m = mask.float().cpu()
        masked = m == 1 if dtype == torch.bfloat16 else m < -1e4   # bf16: 1 marks a masked entry
        _require(bool(((m == 0) | masked).all()), op, f"mask values for {dtype} must be 0 or "
                 + ("1" if dtype == torch.bfloat16 else "float32.min (-inf)"))
        n = mask.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        _require(bool((masked == causal).all()), op, "mask must be upper-triangular causal (masked above diagonal)")

    # ---- math ----------------------------------------------------------------------------------------------
    @staticmethod
    def _gather(cache, table_row, total):
        """The first `total` tokens of one sequence, token by token as ATB addresses them: token t sits at offset
        t % block_size of block table_row[t // block_size]. Written here on purpose, not taken from the backends
        (ops/attention_torch.py gather_blocks), so that the emulator stays an oracle independent of them."""
        block_size = cache.shape[1]
        table = table_row.tolist()
        return torch.stack([cache[table[t // block_size], t % block_size] for t in range(total)])

    @staticmethod
    def _attend(q, k, v, scale, q_offset):
        """q [Lq, H, D] at positions q_offset.., k/v [Lk, Hkv, D]; causal; float32."""
        rep = q.shape[1] // k.shape[1]
        q, k, v = q.float(), k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(q.shape[0], device=q.device).unsqueeze(1) + q_offset
        scores = scores.masked_fill(torch.arange(k.shape[0], device=q.device).unsqueeze(0) > q_pos, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)

    # ---- ops (names and argument order as in op-plugin's TORCH_LIBRARY defs) -------------------------------
    def _npu_reshape_and_cache(self, key, value, key_cache, value_cache, slot_indices):
        op = "_npu_reshape_and_cache"
        self.calls[op] += 1
        self._dtypes(op, key, value, key_cache, value_cache)
        _require(key.dim() == 3 and key.shape == value.shape, op,
                 f"key/value must be [tokens, num_kv_heads, head_dim], got {tuple(key.shape)}, {tuple(value.shape)}")
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            self._cache(op, name, cache, key.shape[1], key.shape[2])
        _require(slot_indices.dtype == torch.int32, op, f"slot_indices must be int32, got {slot_indices.dtype}")
        _require(slot_indices.device == key.device, op, f"slot_indices must be on {key.device}")
        _require(slot_indices.shape == (key.shape[0],), op,
                 f"slot_indices must be [{key.shape[0]}], got {tuple(slot_indices.shape)}")
        slots = slot_indices.long()
        total = key_cache.shape[0] * key_cache.shape[1]
        _require(bool(((slots >= 0) & (slots < total)).all()), op, f"slot_indices must lie in [0, {total})")
        key_cache.view(total, *key.shape[1:])[slots] = key
        value_cache.view(total, *key.shape[1:])[slots] = value

    def _npu_flash_attention(self, query, key, value, mask, seq_len, scale_value, num_heads, num_kv_heads, out):
        op = "_npu_flash_attention"
        self.calls[op] += 1
        self._dtypes(op, query, key, value, out)
        self._heads(op, query, num_heads, num_kv_heads)
        _require(key.shape == value.shape == (query.shape[0], num_kv_heads, query.shape[2]), op,
                 f"key/value must be [{query.shape[0]}, {num_kv_heads}, {query.shape[2]}], got {tuple(key.shape)}")
        self._host_lens(op, "seq_len", seq_len)
        _require(int(seq_len.sum()) == query.shape[0], op,
                 f"seq_len sums to {int(seq_len.sum())}, query has {query.shape[0]} tokens")
        _require(mask.shape[0] >= int(seq_len.max()), op, f"mask {tuple(mask.shape)} is smaller than the longest "
                                                          f"sequence {int(seq_len.max())}")
        self._causal_mask(op, mask, query.dtype)
        self._out(op, out, query)
        start = 0
        for n in seq_len.tolist():
            rows = slice(start, start + n)
            out[rows] = self._attend(query[rows], key[rows], value[rows], scale_value, 0).to(out.dtype)
            start += n

    def _paged_common(self, op, query, key_cache, value_cache, out, num_heads, num_kv_heads) -> None:
        """The checks every op that reads the paged caches makes first."""
        self.calls[op] += 1
        self._dtypes(op, query, key_cache, value_cache, out)
        self._heads(op, query, num_heads, num_kv_heads)
        for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
            self._cache(op, name, cache, num_kv_heads, query.shape[2])

    def _npu_flash_attention_qlens(self, query, key_cache, value_cache, block_table, mask, seq_len, context_lens,
                                   num_kv_heads, num_heads, scale_value, out):
        op = "_npu_flash_attention_qlens"
        self._paged_common(op, query, key_cache, value_cache, out, num_heads, num_kv_heads)
        self._host_lens(op, "seq_len", seq_len)
        self._host_lens(op, "context_lens", context_lens, seq_len.numel())
        _require(int(seq_len.sum()) == query.shape[0], op,
                 f"seq_len sums to {int(seq_len.sum())}, query has {query.shape[0]} tokens")
        _require(bool((seq_len <= context_lens).all()), op, "seq_len must not exceed context_lens")
        self._block_table(op, block_table, seq_len.numel(), key_cache, context_lens, query.device)
        self._causal_mask(op, mask, query.dtype, COMPRESSED_MASK_SIZE)
        self._out(op, out, query)
        start = 0
        for i, (n, total) in enumerate(zip(seq_len.tolist(), context_lens.tolist())):
            k = self._gather(key_cache, block_table[i], total)
            v = self._gather(value_cache, block_table[i], total)
            out[start:start + n] = self._attend(query[start:start + n], k, v, scale_value, total - n).to(out.dtype)
            start += n

    def _npu_paged_attention(self, query, key_cache, value_cache, num_kv_heads, num_heads, scale_value,
                             block_table, context_lens, out):
        op = "_npu_paged_attention"
        self._paged_common(op, query, key_cache, value_cache, out, num_heads, num_kv_heads)
        self._host_lens(op, "context_lens", context_lens, query.shape[0])
        self._block_table(op, block_table, query.shape[0], key_cache, context_lens, query.device)
        self._out(op, out, query)
        for i, total in enumerate(context_lens.tolist()):
            k = self._gather(key_cache, block_table[i], total)
            v = self._gather(value_cache, block_table[i], total)
            out[i] = self._attend(query[i:i + 1], k, v, scale_value, total - 1)[0].to(out.dtype)


class EmulatorHandle:
    """Returned by install_emulator(): `.module` is the fake torch_npu; use as a context manager or call
    `.uninstall()` to put back whatever `sys.modules["torch_npu"]` held before."""

    def __init__(self, module: EmulatedTorchNpu):
        self.module = module
        self._missing = object()
        self._previous = sys.modules.get("torch_npu", self._missing)
        sys.modules["torch_npu"] = module

    def uninstall(self) -> None:
        if sys.modules.get("torch_npu") is self.module:
            if self._previous is self._missing:
                del sys.modules["torch_npu"]
            else:
                sys.modules["torch_npu"] = self._previous

    def __enter__(self) -> EmulatedTorchNpu:
        return self.module

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_emulator(allow_float32: bool = True) -> EmulatorHandle:
    """Make `import torch_npu` return the emulator (nothing is added to `torch`: the backend needs no torch.npu
    when its tensors live on the CPU)."""
    return EmulatorHandle(EmulatedTorchNpu(allow_float32))
