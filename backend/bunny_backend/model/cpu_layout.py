"""CPU weight layout for the decoder's projections and an untied LM head, and the decoder's fused CPU ops.

Measured on the 2-core AVX-512 machines (docs/performance.md): fp32 `F.linear` streams a [5632, 1024] weight at
~21 GB/s for one row and only ~10 GB/s for 2-10 rows (MKL's small-M GEMM). oneDNN with the weight prepacked once
(`mkldnn._reorder_linear_weight`) streams a cache-resident one at ~40-55 GB/s for 1-16 rows and is 2x faster on
300-row prefills, but reads a whole model's weights from DRAM at only 22-28 GB/s for a few rows. Our column-panel
kernel (PanelLinear, ops/csrc/panel_linear.cpp) reads them at 38-44 GB/s and keeps level with oneDNN from 10 to
730 rows, so it is the first choice wherever it builds (AVX-512; bf16 also needs AVX512-BF16). Next comes oneDNN,
where it takes the weight's dtype on this CPU (not without oneDNN, nor bf16 without AVX512BW: its bf16 reorder
raises inside oneDNN there; utils/cpu_features.py); last a contiguous [in, out] weight (`x @ W_t`), which still
beats `F.linear` for single rows. Layers are converted one at a time after loading, so weights are never held
twice.
"""
from __future__ import annotations

import torch
from torch import nn

import logging

from bunny_backend.model.quantized_linear import Int8Linear, W8A8Linear, quantized_linears
from bunny_backend.ops import cpu_kernels
from bunny_backend.utils.cpu_features import CpuFeatures, detect

log = logging.getLogger("bunny.engine")


class _CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        return self.matmul(x)


class OneDnnLinear(_CpuLinear):
    """The weight is an opaque oneDNN-packed tensor (not an nn.Parameter: it has no strided storage)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


class TransposedLinear(_CpuLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class PanelLinear(_CpuLinear):
    """The weight packed into column panels for our C++ kernel (ops/csrc/panel_linear.cpp): it streams the weight
    at close to the read bandwidth for a decode step's few rows and keeps level with oneDNN on prefills."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self._kernel = cpu_kernels.panel_linear(linear.weight.dtype)
        if self._kernel is None:
            raise ValueError(f"no panel kernel for {linear.weight.dtype} on this CPU")
        self.panels = torch.ops.bunny.pack_panels(linear.weight.detach())
        self.bias_f32 = None if self.bias is None else self.bias.detach().float()

    @staticmethod
    def takes(linear: nn.Linear) -> bool:
        dtype = linear.weight.dtype
        return (dtype == torch.float32 or linear.in_features % 2 == 0) and cpu_kernels.panel_linear(dtype) is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.panels, self.out_features, self.bias_f32)


class Int8PanelLinear(_CpuLinear):
    """An int8 linear (model/quantized_linear.py) with its weight in column panels for our C++ kernel
    (ops/csrc/int8_panel_linear.cpp), which widens the int8 weights to float32 in registers: the activations stay
    in the model dtype."""

    def __init__(self, linear: Int8Linear):
        super().__init__(linear)
        self._kernel = cpu_kernels.int8_panel_linear()
        if self._kernel is None:
            raise ValueError("no int8 panel kernel on this CPU")
        self.panels = torch.ops.bunny.pack_int8_panels(linear.qweight.detach())
        self.weight_scale = linear.weight_scale.detach()
        self.bias_f32 = None if self.bias is None else self.bias.detach().float()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.panels, self.weight_scale, self.out_features, self.bias_f32)


class Int8VnniLinear(_CpuLinear):
    """An int8 linear with its weight in VNNI panels (ops/csrc/int8_vnni_linear.cpp): the activations are quantized
    per row at each call (asymmetric) and multiplied by vpdpbusd, four weights per instruction and lane. int8
    quantizes them to 16 bits (two u8 planes: finer than the bf16 activations, so weight-only accuracy), w8a8 to 8
    (half the instructions, about as much logit error again as the weights', docs/performance.md)."""

    def __init__(self, linear: Int8Linear):
        super().__init__(linear)
        self._kernel = cpu_kernels.int8_vnni_linear()
        if self._kernel is None:
            raise ValueError("no int8 VNNI kernel on this CPU")
        self.activation_bits = 8 if isinstance(linear, W8A8Linear) else 16
        self.panels, self.column_sums = torch.ops.bunny.pack_int8_vnni(linear.qweight.detach())
        self.weight_scale = linear.weight_scale.detach()
        self.bias_f32 = None if self.bias is None else self.bias.detach().float()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x, self.panels, self.column_sums, self.weight_scale, self.out_features, self.bias_f32,
                            self.activation_bits)


def int8_cpu_linear_class(linear: Int8Linear) -> type[_CpuLinear] | None:
    """The kernel for a quantized linear on this CPU, the same at every row count: the VNNI kernel where it builds
    (int8 with 16-bit activations, w8a8 with 8-bit; faster than the widening kernel from 1 to 256 rows,
    docs/performance.md), else the widening kernel (AVX-512; w8a8 then runs weight-only); None: the portable path
    (model/quantized_linear.py)."""
    if cpu_kernels.int8_vnni_linear() is not None:
        return Int8VnniLinear
    return Int8PanelLinear if cpu_kernels.int8_panel_linear() is not None else None


def cpu_layout(linear: nn.Linear, cpu: CpuFeatures | None = None) -> _CpuLinear:
    """Column panels where our kernel takes the weight, else oneDNN's packing or the transposed layout."""
    if PanelLinear.takes(linear):
        return PanelLinear(linear)
    return cpu_linear_class(linear.weight.dtype, cpu)(linear)


def cpu_linear_class(dtype: torch.dtype = torch.float32, cpu: CpuFeatures | None = None) -> type[_CpuLinear]:
    """oneDNN-packed where this CPU's oneDNN takes the dtype, else the transposed layout."""
    return OneDnnLinear if (cpu or detect()).can_pack(dtype) else TransposedLinear


def use_cpu_linears(model: nn.Module, cls: type[_CpuLinear] | None = None) -> None:
    """Swap the decoder's projections (and an untied LM head), the vision tower's and the projector's linears for
    the CPU layout (cpu_layout, or `cls`), in place. int8 ones (model/quantized_linear.py) go to the int8 kernel
    int8_cpu_linear_class chooses, else keep the portable path (a kernel's build failure is logged once)."""
    convert = cls or cpu_layout
    weight_only_w8a8 = False
    for parent, name in quantized_linears(model):
        linear = getattr(parent, name)
        if type(linear) is nn.Linear:
            setattr(parent, name, convert(linear))
        elif isinstance(linear, Int8Linear):
            int8_class = int8_cpu_linear_class(linear)
            weight_only_w8a8 |= isinstance(linear, W8A8Linear) and int8_class is not Int8VnniLinear
            if int8_class is not None:
                setattr(parent, name, int8_class(linear))
    if weight_only_w8a8:
        log.warning("bunny: quantization w8a8 needs the int8 VNNI kernel (AVX512-VNNI), not available here: its "
                    "linears run as int8, weight-only")
    for name in ("vision_tower", "mm_projector"):   # on the tensor-parallel driver only
        if (part := getattr(model.model, name, None)) is not None:
            _convert_linears(part, convert)


def _convert_linears(module: nn.Module, convert) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, convert(child))
        else:
            _convert_linears(child, convert)


def use_fused_cpu_ops(model: nn.Module) -> None:
    """Run the decoder's RMSNorms, rotary and SiLU-mul on our fused C++ ops (ops/csrc/decoder_ops.cpp) where they
    build. At batch 10 a decode step otherwise spends ~2.5 ms of 24 (bf16, qwen bench model) in ~100 small ATen
    ops and their temporaries; a 210-token prefill ~10 ms."""
    ops = cpu_kernels.decoder_ops()
    if ops is not None:
        model.model.use_fused_ops(ops)
