"""Import open_clip (the CLIP judge) without letting PyPI's torchvision break the rest of the project.

PyPI's x86_64 torchvision wheels are CUDA builds: beside the CPU torch wheel their `_C.so` cannot load (no
libtorch_cuda.so), and `import torchvision` dies in `_meta_registrations.py` with "operator torchvision::nms does
not exist" (its fake-kernel registrations for nms/qnms are unguarded). Installed site-wide, that also breaks
transformers (it imports torchvision whenever it is installed). So open-clip-torch and torchvision live in a
private folder, `<venv>/clip-site` (or $BUNNY_CLIP_SITE), that only this module puts on sys.path:

    pip install --no-deps --target .venv/clip-site open-clip-torch==3.3.0 torchvision==0.28.0 ftfy==6.3.1 wcwidth==0.9.4

When torchvision's ops cannot load we declare the two op schemas (no kernels: detection ops stay unusable, as
they already were) and import again; open_clip needs only torchvision's pure-Python transforms. Where
open_clip and a working torchvision are installed normally (e.g. a CUDA torch with its torchvision), they are
used as they are.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the schema fragment registered for the life of the process
INSTALL_HINT = ("pip install --no-deps --target .venv/clip-site open-clip-torch==3.3.0 torchvision==0.28.0 "
                "ftfy==6.3.1 wcwidth==0.9.4  (./build.sh setup does it)")


def clip_site() -> Path:
    return Path(os.environ.get("BUNNY_CLIP_SITE") or Path(sys.prefix) / "clip-site")


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    global _library
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import torch

    _forget_torchvision()
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                _library.define(schema)
            except RuntimeError:  # already declared
                pass
    import torchvision
    return torchvision


def import_open_clip():
    """`open_clip`, with torchvision made importable first. Raises ImportError with an install hint."""
    if importlib.util.find_spec("open_clip") is None and clip_site().is_dir():
        sys.path.append(str(clip_site()))
    try:
        import_torchvision()
        import open_clip
    except ImportError as err:
        raise ImportError(f"clip-score needs open-clip-torch and torchvision ({err}); install them with: "
                          f"{INSTALL_HINT}") from err
    return open_clip
