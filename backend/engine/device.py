"""What the engine's configuration means on the device it runs on: the one home of the per-device policy.

`DevicePlan.resolve(config)` picks the device (auto: npu > cuda > cpu), the dtype (float32 on the CPU, bfloat16 on
accelerators), the KV block size (16, or 128 on the NPU) and the attention backend (the device's own). After
loading, `prepare_model` gives the weights the device's layout (packed linears on the CPU), and `graph_capture`
says whether decode steps can be captured as CUDA graphs (device cuda with the Triton paged-decode kernel).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.decode_graphs import GraphCapture
from bunny_backend.model.cpu_layout import use_cpu_linears
from bunny_backend.model.loader import DTYPES
from bunny_backend.ops import triton_paged_decode

log = logging.getLogger("bunny.engine")


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)
    return torch.npu.is_available()   # type: ignore[attr-defined]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    if name == "npu" and not npu_available():
        raise ValueError("device 'npu' requested but torch_npu is not installed or sees no NPU")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


@dataclass(frozen=True, slots=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype
    block_size: int
    attention_backend: str     # torch, cuda or npu (ops.attention.get_backend)
    cuda_graphs: bool          # asked for (ignored off CUDA); graph_capture() says whether it can be done

    @classmethod
    def resolve(cls, config: EngineConfig) -> "DevicePlan":
        device = resolve_device(config.device)
        backend = config.attention_backend
        if backend == "auto":
            backend = device.type if device.type in ("cuda", "npu") else "torch"
        return cls(device=device, dtype=resolve_dtype(config.dtype, device),
                   block_size=config.block_size or (128 if device.type == "npu" else 16),
                   attention_backend=backend, cuda_graphs=config.cuda_graphs)

    def prepare_model(self, model) -> None:
        """The weight layout the device runs fastest, applied in place after loading."""
        if self.device.type == "cpu":
            use_cpu_linears(model)

    def graph_capture(self, head_dim: int) -> GraphCapture | None:
        """torch.cuda graph capture when asked for and the decode attention can be captured, else None."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        reason = (f"attention backend {self.attention_backend}" if self.attention_backend != "cuda" else
                  triton_paged_decode.unsupported_for(self.dtype, head_dim, self.block_size))
        if reason:
            log.warning("bunny: cuda_graphs is on but decode runs eagerly: %s", reason)
            return None
        return GraphCapture()
