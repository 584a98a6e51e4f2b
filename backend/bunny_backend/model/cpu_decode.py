"""Decode-only steps on the CPU kernels as one flat loop over the layers.

The loop calls the same ops as the decoder's modules with the CPU layout and the fused ops (qwen2.py, layers.py,
cpu_layout.py, ops/attention_torch.py), in the same order on the same tensors, so its hidden states are identical
to theirs; it only leaves out the Python around them: ~90 module calls, context look-ups and kernel look-ups a
step, 0.5 ms of an 18 ms batch-1 step and 0.9 of a 24 ms batch-10 one on the 2-core bench machine (docs/performance.md).
Prefill and mixed steps keep the modules. `use_cpu_decode_loop(model)` installs it where every piece is there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from bunny_backend.model.cpu_layout import Int8PanelLinear, Int8VnniLinear, PanelLinear
from bunny_backend.model.layers import rotary_cos_sin
from bunny_backend.ops import cpu_kernels
from bunny_backend.utils.context import ForwardContext


class _Layer(NamedTuple):
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: PanelLinear | Int8PanelLinear | Int8VnniLinear
    o: PanelLinear | Int8PanelLinear | Int8VnniLinear
    gate_up: PanelLinear | Int8PanelLinear | Int8VnniLinear
    down: PanelLinear | Int8PanelLinear | Int8VnniLinear
    attn: nn.Module       # layers.Attention: its k_cache, v_cache and backend are the model runner's


class CpuDecodeLoop:
    def __init__(self, text_model: nn.Module, ops):
        self.cfg, self.ops = text_model.cfg, ops
        self.final_norm = text_model.norm.weight
        self.eps = text_model.norm.eps
        first = text_model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.layers = [_Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                              layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                              layer.mlp.down_proj, layer.self_attn.attn) for layer in text_model.layers]

    def runs(self, ctx: ForwardContext) -> bool:
        """A decode-only step whose caches the portable backend keeps (its paged decode is the C++ kernel)."""
        attn = self.layers[0].attn
        return (not ctx.is_prefill and ctx.slot_mapping is not None and attn.k_cache is not None
                and getattr(attn.backend, "name", None) == "torch")

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        ops, eps = self.ops, self.eps
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rotary_cos_sin(positions, head_dim, self.cfg.rope_theta, x.dtype)
        slots, tables, lens = ctx.slot_mapping, ctx.block_tables, ctx.context_lens
        residual = None
        for layer in self.layers:
            if residual is None:
                h, residual = ops.rms_norm(x, layer.input_norm, eps), x
            else:
                h, residual = ops.add_rms_norm(x, residual, layer.input_norm, eps)
            qkv = layer.qkv.matmul(h)
            q, k = ops.rotary_qk(qkv, cos, sin, heads, kv_heads, head_dim)
            v = qkv[:, (heads + kv_heads) * head_dim:].view(-1, kv_heads, head_dim)
            attn = layer.attn
            attn.backend.store_kv(k, v, attn.k_cache, attn.v_cache, slots)
            out = ops.paged_decode(q, attn.k_cache, attn.v_cache, tables, lens, attn.scale)
            h, residual = ops.add_rms_norm(layer.o.matmul(out.reshape(-1, heads * head_dim)), residual,
                                           layer.post_norm, eps)
            x = layer.down.matmul(ops.silu_mul(layer.gate_up.matmul(h)))
        return ops.add_rms_norm(x, residual, self.final_norm, eps)[0]


def use_cpu_decode_loop(model: nn.Module) -> None:
    """Give the decoder the flat decode loop where its pieces are all there: every projection in column panels,
    (bf16/fp32, int8 or w8a8), the fused ops on (model/cpu_layout.py), the paged decode kernel built, and the whole model on this process."""
    text = model.model
    ops = text.layers[0].mlp.ops
    if ops is None or cpu_kernels.paged_decode() is None or text.layers[0].self_attn.tp.size != 1:
        return
    projections = [p for layer in text.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if all(isinstance(p, (PanelLinear, Int8PanelLinear, Int8VnniLinear)) for p in projections):
        text.decode_loop = CpuDecodeLoop(text, ops)
