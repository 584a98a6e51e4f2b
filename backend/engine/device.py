"""Pick the device and dtype the engine runs on."""
from __future__ import annotations

import importlib.util

import torch

from bunny_backend.model.loader import DTYPES


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
