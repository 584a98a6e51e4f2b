"""The Qwen2 (= Qwen1.5) decoder over packed tokens [N, hidden]; attention metadata comes from the context.

Every module holds one tensor-parallel rank's slice (model/sharding.py; the whole model at size 1). Each linear
that holds a slice of checkpoint tensors names them in `checkpoint_shards` (checkpoint module name -> Shard), which
the loader reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bunny_backend.model.config import TextConfig
from bunny_backend.model.layers import Attention, RMSNorm, apply_rotary, rotary_cos_sin
from bunny_backend.model.sharding import TextShards
from bunny_backend.utils.context import get_context


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig, shards: TextShards):
        super().__init__()
        self.tp = shards.tp
        self.num_heads, self.num_kv_heads, self.head_dim = shards.num_heads, shards.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)   # column-parallel
        self.qkv_proj.checkpoint_shards = shards.qkv()
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)                      # row-parallel
        self.o_proj.checkpoint_shards = shards.o_proj()
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.ops = None   # the fused decoder ops where they run the rotary (Qwen2Model.use_fused_ops)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.ops is not None:
            q, k = self.ops.rotary_qk(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), cos, sin)
            k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._out(self.attn(*self._qkv(x, cos, sin)))

    def forward_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """K/V of every row into the cache; the attention output of `rows` only (the context's output rows)."""
        attn = self.attn.forward_rows(*self._qkv(x, cos, sin), rows)
        return self._out(attn) if rows.numel() else x.new_empty((0, x.shape[-1]))

    def _out(self, attn: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.o_proj(attn.reshape(-1, self.q_size)))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig, shards: TextShards):
        super().__init__()
        self.tp = shards.tp
        inter = shards.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * inter, bias=False)   # column-parallel
        self.gate_up_proj.checkpoint_shards = shards.gate_up()
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)          # row-parallel
        self.down_proj.checkpoint_shards = shards.down_proj()
        self.ops = None   # the fused decoder ops where they run SiLU(gate) * up (Qwen2Model.use_fused_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.ops is not None:
            hidden = self.ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return self.tp.all_reduce(self.down_proj(hidden))


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding; ids outside them give zeros, and one all-reduce fills every row."""

    def __init__(self, hidden_size: int, shards: TextShards):
        super().__init__(shards.vocab_rows, hidden_size)
        self.tp, self.start = shards.tp, shards.vocab_start
        self.checkpoint_shards = shards.vocab("embed_tokens")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        embeds = super().forward(local.masked_fill(outside, 0))
        return self.tp.all_reduce(embeds.masked_fill_(outside.unsqueeze(-1), 0))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, shards: TextShards):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, shards)
        self.mlp = Qwen2MLP(cfg, shards)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings for the first layer, with residual None);
        residual: the stream before it. Returns this layer's MLP output and the stream before it, so each
        residual add happens inside the next norm (one pass over the rows, fused on the CPU)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, cos, sin), residual)
        return self.mlp(h), residual

    def forward_rows(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As forward, for the last layer of a step whose output is read at `rows` only: every row's K/V goes
        to the cache, the rest of the layer (attention, o_proj, MLP) runs on those rows."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        attn = self.self_attn.forward_rows(h, cos, sin, rows)
        residual = residual.index_select(0, rows)
        if rows.numel() == 0:
            return attn, residual
        h, residual = self.post_attention_layernorm.add_forward(attn, residual)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers and the final norm; names match the checkpoint's `model.*`."""

    def __init__(self, cfg: TextConfig, shards: TextShards):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.hidden_size, shards)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, shards) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.decode_loop = None   # decode-only steps on the CPU kernels without the modules (model/cpu_decode.py)

    def use_fused_ops(self, ops) -> None:
        """Run the RMSNorms, rotary and SiLU-mul on `ops` (rms_norm, add_rms_norm, rotary_qk, silu_mul): the C++
        CPU ops (model/cpu_layout.py) or the Triton ones on CUDA (ops/triton_fused.py)."""
        for layer in self.layers:
            for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, layer.mlp):
                module.ops = ops
        self.norm.ops = ops

    def decode_embeds(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states of every row, or of the context's output_rows where it names them."""
        ctx = get_context()
        if self.decode_loop is not None and self.decode_loop.runs(ctx):
            return self.decode_loop(inputs_embeds, positions, ctx)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        rows = ctx.output_rows
        x, residual = inputs_embeds, None
        for layer in self.layers[:-1]:
            x, residual = layer(x, residual, cos, sin)
        last = self.layers[-1]
        if rows is not None and last.self_attn.attn.k_cache is not None:
            x, residual = last.forward_rows(x, residual, cos, sin, rows)
            if rows.numel() == 0:
                return x
        else:
            x, residual = last(x, residual, cos, sin)
            if rows is not None:
                x, residual = x.index_select(0, rows), residual.index_select(0, rows)
        return self.norm.add_forward(x, residual)[0]
