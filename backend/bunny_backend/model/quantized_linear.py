"""Linears over quantized weights, and `quantize_model`, which swaps a loaded model's decoder linears for them
(issue #30: weight-only int8 on the CPU, int8 weights and activations (w8a8) on CPUs with AVX512-VNNI, FP8 E4M3 on
CUDA, quantized at load from the bf16/fp16/fp32 checkpoint).

Quantized: each decoder layer's q/k/v (one fused qkv_proj), o_proj, gate/up (one gate_up_proj) and down_proj, and
an untied LM head. Kept in the model dtype: the embeddings (and a tied LM head, which is the embedding), the norms,
the vision tower and the projector. Under tensor parallelism each rank quantizes its own slice: the scales are per
output channel of that slice, so they shard like the weights.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from bunny_backend.ops.int8_linear import int8_linear
from bunny_backend.ops.weight_quant import FP8_MAX, dequantize, quantize_fp8, quantize_int8

log = logging.getLogger("bunny.engine")

METHODS = ("none", "int8", "w8a8", "fp8")


class _QuantizedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, quantize):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize(linear.weight.detach())
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return self.matmul(x)


class Int8Linear(_QuantizedLinear):
    """Weight-only int8: the activations stay in the model dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, quantize_int8)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.weight_scale, self.bias)


class W8A8Linear(Int8Linear):
    """int8 weights, and activations quantized to 8 bits per row at each call: the CPU layout (model/cpu_layout.py)
    puts it on the VNNI kernel (ops/csrc/int8_vnni_linear.cpp), where int8 goes too with 16-bit activations; the 8
    bits take half the instructions (faster from a few rows on) but about twice int8's logit error
    (docs/performance.md). Where that kernel does not build it runs as int8 (weight-only, with a warning); CPU only."""

    def __init__(self, linear: nn.Linear):
        if linear.weight.device.type != "cpu":
            raise ValueError(f"quantization w8a8 runs on the CPU only, not {linear.weight.device.type} (on CUDA "
                             "choose fp8)")
        super().__init__(linear)


class Fp8Linear(_QuantizedLinear):
    """E4M3 weights and E4M3 activations with a dynamic scale per token, multiplied by `torch._scaled_mm` (CUDA,
    compute capability >= 8.9) with the row-wise scales applied to its float32 accumulators. Shapes it does not
    take (in or out features not a multiple of 16, a non-bf16 output) dequantize the weight instead."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, quantize_fp8)
        self.scaled_mm = (linear.weight.dtype == torch.bfloat16 and linear.weight.is_cuda
                          and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled_mm:
            return nn.functional.linear(x, dequantize(self.qweight, self.weight_scale, x.dtype), self.bias)
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_(min=1e-12)
        xq = (x.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :],
                                bias=self.bias, out_dtype=x.dtype)


_CLASSES = {"int8": Int8Linear, "w8a8": W8A8Linear, "fp8": Fp8Linear}


def quantized_linears(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear `quantize_model` replaces."""
    found = [(parent, name) for layer in model.model.layers
             for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                  (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj"))]
    if not model.config.text.tie_word_embeddings:
        found.append((model, "lm_head"))
    return found


def quantize_model(model: nn.Module, method: str) -> int:
    """Replace the linears `quantized_linears` names by `method`'s (in place, one at a time, so the model dtype's
    weight of each is freed before the next is quantized); returns the bytes saved. `none` does nothing."""
    if method == "none":
        return 0
    if method not in _CLASSES:
        raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
    before = after = 0
    for parent, name in quantized_linears(model):
        linear = getattr(parent, name)
        before += linear.weight.numel() * linear.weight.element_size()
        quantized = _CLASSES[method](linear)
        after += sum(p.numel() * p.element_size() for p in (quantized.qweight, quantized.weight_scale))
        setattr(parent, name, quantized)
        del linear
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the freed weights go back to the device, where the KV cache sizing sees them
    dtype = model.model.embed_tokens.weight.dtype
    log.info("bunny: %s weights: the decoder's linears%s quantized (%.1f MB -> %.1f MB, %.1f MB saved); the "
             "embeddings, norms, vision tower and projector stay in %s", method,
             "" if model.config.text.tie_word_embeddings else " and the LM head", before / 1e6, after / 1e6,
             (before - after) / 1e6, str(dtype).removeprefix("torch."))
    return before - after


def check_tensor_parallel(method: str, text_cfg, tp_size: int) -> None:
    """Each rank quantizes its slice per output channel, so every quantized layer whose output channels are split
    (column-parallel q/k/v and gate/up, an untied vocabulary-parallel LM head) must split them into whole, equal
    slices: unquantized, the LM head's last rank is padded instead, and a padded slice would take scales of rows
    that do not exist. (o_proj and down_proj split their inputs: every rank keeps all their output channels.)"""
    if method == "none" or tp_size == 1:
        return
    channels = {"q_proj": text_cfg.num_attention_heads * text_cfg.head_dim,
                "k_proj/v_proj": text_cfg.num_key_value_heads * text_cfg.head_dim,
                "gate_proj/up_proj": text_cfg.intermediate_size}
    if not text_cfg.tie_word_embeddings:
        channels["lm_head"] = text_cfg.vocab_size
    if text_cfg.num_key_value_heads < tp_size:
        del channels["k_proj/v_proj"]   # each KV head is replicated on several ranks, whole (model/sharding.py)
    problems = [f"{name} ({n})" for name, n in channels.items() if n % tp_size]
    if problems:
        raise ValueError(f"quantization {method} with tensor_parallel_size {tp_size}: the output channels of "
                         f"{', '.join(problems)} do not divide by {tp_size}, and each rank quantizes a whole, equal "
                         "slice of them; choose a tensor_parallel_size that divides them, or quantization none")
