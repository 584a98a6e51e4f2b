"""What the CPU can do for the engine's dtypes and weight layouts, asked once per process.

CPUs differ between the machines this runs on: some have AVX-512 with BF16 (and AMX), some only AVX2. oneDNN's
bf16 kernels, and its bf16 weight reorder, need AVX512BW at least: on an AVX2-only CPU
`mkldnn._reorder_linear_weight` of a bf16 weight raises inside oneDNN. torch says which oneDNN paths run here
(`torch.ops.mkldnn._is_mkldnn_bf16_supported`, the same check its own ops make); /proc/cpuinfo says whether bf16
arithmetic is native (AVX512_BF16 or AMX-BF16) rather than emulated.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_fp16")


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    isa: str                      # torch's vector ISA for its own kernels: AVX512, AVX2, DEFAULT, ...
    flags: frozenset[str]         # /proc/cpuinfo flags (those in REPORTED_FLAGS)
    onednn: bool                  # torch was built with oneDNN
    onednn_bf16: bool             # oneDNN's bf16 kernels (and bf16 weight packing) run on this CPU
    onednn_fp16: bool

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512_BF16 or AMX), not emulated through fp32."""
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    def can_pack(self, dtype: torch.dtype) -> bool:
        """Whether oneDNN can prepack (and multiply) a weight of this dtype here."""
        if not self.onednn:
            return False
        return {torch.float32: True, torch.bfloat16: self.onednn_bf16, torch.float16: self.onednn_fp16}.get(dtype, False)

    def describe(self) -> dict:
        return {"isa": self.isa, "flags": sorted(self.flags), "onednn": self.onednn,
                "onednn_bf16": self.onednn_bf16, "onednn_fp16": self.onednn_fp16, "native_bf16": self.native_bf16}


def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(f for f in line.partition(":")[2].split() if f in REPORTED_FLAGS)


def _onednn_check(name: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def detect() -> CpuFeatures:
    onednn = torch.backends.mkldnn.is_available()
    return CpuFeatures(isa=torch.backends.cpu.get_cpu_capability(), flags=_cpuinfo_flags(), onednn=onednn,
                       onednn_bf16=onednn and _onednn_check("_is_mkldnn_bf16_supported"),
                       onednn_fp16=onednn and _onednn_check("_is_mkldnn_fp16_supported"))
