"""Our C++ CPU kernels (csrc/), compiled on first use with torch's JIT extension builder, for this machine's CPU.

`paged_decode()` gives the paged decode-attention op, `panel_linear(dtype)` the linear over weights packed in
column panels (the decoder's projections, the LM head) and `decoder_ops()` the fused RMSNorm, rotary and SiLU-mul,
or None where they cannot be built (no compiler, no ninja, a
failed compile: one warning says why) or BUNNY_CPU_KERNELS=0 asks for the portable path; callers then keep the
portable code. The build goes to build/torch_extensions in a checkout (git ignores build/), else to torch's default
folder, in a subfolder per torch version and CPU (the code is compiled with -march=native); a file lock lets
processes that start together (Triton instances, test workers) build it once. `./build.sh setup` prebuilds it:
`python -m bunny_backend.ops.cpu_kernels` builds, prints nothing, and exits 1 with the reason if it cannot.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from bunny_backend.utils.cpu_features import detect

log = logging.getLogger(__name__)

ENV_VAR = "BUNNY_CPU_KERNELS"   # "0": use the portable code
SOURCES = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]   # OpenMP: at::parallel_for's threads are torch's
LDFLAGS = ["-fopenmp"]   # not -ffast-math: linked into a shared object it would set flush-to-zero process-wide


class KernelUnavailable(RuntimeError):
    pass


def build_dir() -> Path:
    """Where the builds go: per torch version and CPU, so a build never runs on a CPU it was not compiled for."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file():
        base = root / "build" / "torch_extensions"
    else:
        from torch.utils.cpp_extension import get_default_build_root
        base = Path(get_default_build_root())
    return base / f"torch{torch.__version__}-{_cpu_tag()}"


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{os.uname().machine} {flags}".encode()).hexdigest()[:10]


def build(name: str, out_dir: Path) -> None:
    """Compile csrc/<name>.cpp (if it changed) and load it into this process: its ops appear under torch.ops.
    Raises KernelUnavailable naming the reason."""
    try:
        import fcntl
    except ImportError:
        raise KernelUnavailable("the build lock needs a POSIX system") from None
    from torch.utils import cpp_extension
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler ({compiler!r} not found)")
    if not _ninja_on_path():
        raise KernelUnavailable("ninja is not installed")
    out = out_dir / name
    out.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the holder exits, even if it crashed mid-build
        # torch's own lock file, left behind by a build that was killed, would make the next one wait forever;
        # holding our lock, nobody else is building.
        (out / "lock").unlink(missing_ok=True)
        try:
            # copies: torch appends its own flags to the lists it is given, and a list grown by an earlier build in
            # this process changed the command, so ninja rebuilt every kernel whose build order differed
            cpp_extension.load(name=f"bunny_{name}", sources=[str(SOURCES / f"{name}.cpp")],
                               extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(out),
                               is_python_module=False, verbose=False)
        except Exception as e:   # a compiler error, a link error, a library that does not load
            raise KernelUnavailable(_first_lines(str(e))) from e


def _ninja_on_path() -> bool:
    """The pinned ninja package's binary first on PATH, in every process that builds: its bin/ is the venv's, which
    a server's PATH may lack, and ninja versions hash commands differently (1.12 changed it), so a system ninja
    beside the pinned one made each think the other's build was stale and rebuild every kernel, back and forth."""
    try:
        import ninja
    except ImportError:
        return shutil.which("ninja") is not None
    path = os.environ.get("PATH", "")
    if not path.startswith(ninja.BIN_DIR + os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    return shutil.which("ninja") is not None


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))


_REASONS: dict[str, str | None] = {}   # per kernel, once per process: None (loaded) or why it is not available


def load(name: str) -> str | None:
    """Build (if needed) and load csrc/<name>.cpp once per process: None when loaded, else why not (logged once).
    Once only: a second torch JIT build in one process would register the same ops again, which aborts."""
    if name not in _REASONS:
        try:
            build(name, build_dir())
            _REASONS[name] = None
        except KernelUnavailable as e:
            log.warning("the CPU kernel %r is not available, the portable code runs instead: %s", name, e)
            _REASONS[name] = str(e)
    return _REASONS[name]


def paged_decode() -> Callable | None:
    """torch.ops.bunny.paged_decode(q [B, H, D], k_cache, v_cache [num_blocks, block_size, Hkv, D], block_tables
    [B, M] int32, context_lens [B] int32, scale) -> [B, H, D] in q's dtype (float32, bfloat16 or float16 caches),
    or None (see the module docstring)."""
    if os.environ.get(ENV_VAR) == "0" or load("paged_decode") is not None:
        return None
    return torch.ops.bunny.paged_decode


def panel_linear(dtype: torch.dtype) -> Callable | None:
    """torch.ops.bunny.panel_linear(x [M, K], panels, out_features) -> [M, out_features] in x's dtype, over
    torch.ops.bunny.pack_panels(w [out_features, K]) (csrc/panel_linear.cpp), or None where it cannot be built or
    this CPU's build does not take `dtype` (it needs AVX-512, and AVX512-BF16 for bfloat16)."""
    if os.environ.get(ENV_VAR) == "0" or load("panel_linear") is not None:
        return None
    taken = torch.ops.bunny.panel_linear_dtypes().split(",")
    return torch.ops.bunny.panel_linear if str(dtype).removeprefix("torch.") in taken else None


def int8_panel_linear() -> Callable | None:
    """torch.ops.bunny.int8_panel_linear(x [M, K], panels, scale [N] float32, out_features, bias=None) -> [M, N]
    in x's dtype: x @ q.T * scale (+ bias) over torch.ops.bunny.pack_int8_panels(q int8 [N, K])
    (csrc/int8_panel_linear.cpp), or None where it cannot be built or this CPU has no AVX-512."""
    if os.environ.get(ENV_VAR) == "0" or load("int8_panel_linear") is not None:
        return None
    return torch.ops.bunny.int8_panel_linear if torch.ops.bunny.int8_panel_linear_available() else None


def int8_vnni_linear() -> Callable | None:
    """torch.ops.bunny.int8_vnni_linear(x [M, K], panels, wsum, scale [N] float32, out_features, bias=None,
    activation_bits=8) -> [M, N] in x's dtype: x, quantized per row at call time (to u8, or to 16 bits as two u8
    planes), @ q.T * scale (+ bias), over (panels, wsum) =
    torch.ops.bunny.pack_int8_vnni(q int8 [N, K]) (csrc/int8_vnni_linear.cpp), or None where this CPU has no
    AVX512-VNNI (not built there) or it cannot be built."""
    if os.environ.get(ENV_VAR) == "0" or "avx512_vnni" not in detect().flags or load("int8_vnni_linear") is not None:
        return None
    return torch.ops.bunny.int8_vnni_linear if torch.ops.bunny.int8_vnni_linear_available() else None


def decoder_ops():
    """torch.ops.bunny, holding the decoder's fused elementwise ops (csrc/decoder_ops.cpp: rms_norm, add_rms_norm,
    rotary_qk, silu_mul) and the greedy argmax_rows, float32 and bfloat16, or None (see the module docstring)."""
    if os.environ.get(ENV_VAR) == "0" or load("decoder_ops") is not None:
        return None
    return torch.ops.bunny


def causal_attention(head_dim: int) -> Callable | None:
    """torch.ops.bunny.causal_attention(q [L, H, D], k, v [Lk, Hkv, D], scale) -> [L, H, D]: causal attention of a
    prompt's last L rows over its first Lk >= L (csrc/causal_attention.cpp), or None where it cannot be built or
    takes no such head_dim."""
    if os.environ.get(ENV_VAR) == "0" or load("causal_attention") is not None:
        return None
    taken = torch.ops.bunny.causal_attention_head_dims().split(",")
    return torch.ops.bunny.causal_attention if str(head_dim) in taken else None


KERNELS = ("paged_decode", "panel_linear", "decoder_ops", "causal_attention", "int8_panel_linear", "int8_vnni_linear")


def main() -> int:
    try:
        for name in KERNELS:
            build(name, build_dir())
    except KernelUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
