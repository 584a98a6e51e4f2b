"""Installed into .venv-peer as a startup hook (a .pth line): lets PyPI's torchvision import beside the CPU torch.

vLLM's LLaVA model imports transformers' Pixtral image processor, which needs torchvision. PyPI's x86_64
torchvision wheel is a CUDA build: its `_C.so` cannot load beside the CPU torch, and its import then dies
registering fake kernels for `torchvision::nms`/`qnms`, ops that were never declared. On the first
`import torchvision` this declares the two schemas (no kernels: detection ops stay unusable) and lets the import go
on; the pure-Python transforms work. The same fix as bunny_client.openclip_import, for the peer's processes.
"""
import importlib.abc
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _DeclareOps(importlib.abc.MetaPathFinder):
    library = None

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch
        _DeclareOps.library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                _DeclareOps.library.define(schema)
            except RuntimeError:      # declared already (a working torchvision build)
                pass
        return None                   # the regular finders import it


sys.meta_path.insert(0, _DeclareOps())
