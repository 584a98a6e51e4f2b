"""Portable paged attention in plain PyTorch (CPU, or any device torch supports). On the CPU, where they could be
built, decode runs our C++ kernel (cpu_kernels.paged_decode: reads K/V in place through the block tables) and a
prompt's causal attention runs cpu_kernels.causal_attention (1.3-2x torch's CPU flash attention; after a cached
prefix, 2x torch's masked SDPA), fresh or continuing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bunny_backend.ops import cpu_kernels
from bunny_backend.utils.context import ForwardContext


def _sdpa(q, k, v, scale, mask=None, causal=False):
    # [L, H, D] -> [1, H, L, D]; enable_gqa lets SDPA broadcast K/V heads without copying them.
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _cpu_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Our C++ causal attention for prompts (cpu_kernels.causal_attention) where it takes these tensors (CPU,
    float32 or bfloat16, each row's heads contiguous), else None."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return None
    if any(t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] for t in (q, k, v)):
        return None
    return cpu_kernels.causal_attention(q.shape[-1])


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


class TorchAttentionBackend:
    name = "torch"

    def workspace_bytes(self, dtype) -> int:
        return 0   # the decode gather buffers grow with the batch and are not planned

    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale):
        out = torch.empty_like(q)
        kernel = _cpu_causal_attention(q, k, v)
        q_start = 0
        for i, (len_q, len_k) in enumerate(zip(ctx.seqlens_q, ctx.seqlens_k)):
            if not len_q:   # a graph's padding sequence
                continue
            qi, rows = q[q_start:q_start + len_q], slice(q_start, q_start + len_q)
            fresh = k_cache is None or len_k == len_q
            if fresh:
                ki, vi = k[rows], v[rows]
            else:
                table = ctx.block_tables[i]
                ki, vi = gather_blocks(k_cache, table, len_k), gather_blocks(v_cache, table, len_k)
            if kernel is not None:   # after a cached prefix too: the kernel places q's rows last
                out[rows] = kernel(qi, ki, vi, scale)
            elif fresh:
                out[rows] = _sdpa(qi, ki, vi, scale, causal=True)
            else:
                # query row r sits at absolute position len_k - len_q + r
                q_pos = torch.arange(len_k - len_q, len_k, device=q.device).unsqueeze(1)
                mask = q_pos >= torch.arange(len_k, device=q.device).unsqueeze(0)
                out[rows] = _sdpa(qi, ki, vi, scale, mask=mask)
            q_start += len_q
        return out

    def decode(self, q, k_cache, v_cache, ctx: ForwardContext, scale):
        if q.device.type == "cpu" and (kernel := cpu_kernels.paged_decode()) is not None:
            return kernel(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        return self.decode_gathered(q, k_cache, v_cache, ctx, scale)

    def decode_gathered(self, q, k_cache, v_cache, ctx: ForwardContext, scale):
        """The portable decode: gather each sequence's blocks, then one padded SDPA over the batch."""
        block_size = k_cache.shape[1]
        tables = ctx.block_tables.long().clamp_min(0).flatten()   # [B*M]
        b = ctx.block_tables.shape[0]
        width = tables.numel() // b * block_size
        # Gather into reused buffers: fresh multi-MB tensors every layer cost page faults on CPU.
        k = torch.index_select(k_cache, 0, tables, out=self._scratch("k", k_cache, tables.numel()))
        v = torch.index_select(v_cache, 0, tables, out=self._scratch("v", v_cache, tables.numel()))
        k, v = k.view(b, width, *k_cache.shape[2:]), v.view(b, width, *v_cache.shape[2:])
        valid = torch.arange(width, device=q.device).unsqueeze(0) < ctx.context_lens.unsqueeze(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=valid[:, None, None, :], scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[2])
        return out.squeeze(2)

    def _scratch(self, name: str, cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
        buffers = self.__dict__.setdefault("_buffers", {})
        buf = buffers.get(name)
        need = num_blocks * cache[0].numel()
        if buf is None or buf.numel() < need or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = buffers[name] = torch.empty(max(need, 1), dtype=cache.dtype, device=cache.device)
        return buf[:need].view(num_blocks, *cache.shape[1:])
