"""The C++ CPU kernels' tests: build and load one (BUNNY_CPU_KERNELS unset for the test), or skip naming why not.

A plain `pytest` on a machine that cannot build a kernel (no compiler, no ninja) skips its tests with the reason
(`-ra` prints it). `./build.sh test` (and so CI) sets BUNNY_REQUIRE_CPU_KERNELS=1: then a kernel that does not
build, or a panel-linear dtype that this CPU's flags say it takes but the build does not, FAILS its tests instead,
so that a broken csrc/*.cpp cannot leave the suite green on the slower portable path.
"""
from __future__ import annotations

import os

import pytest
import torch

from bunny_backend.ops import cpu_kernels

REQUIRE_VAR = "BUNNY_REQUIRE_CPU_KERNELS"


def kernels_required() -> bool:
    return os.environ.get(REQUIRE_VAR, "") not in ("", "0")


def unavailable(what: str) -> None:
    """Fail (kernels required) or skip (a plain pytest), naming what is missing and why."""
    if kernels_required():
        pytest.fail(f"{what} ({REQUIRE_VAR}=1: the kernels must build on this machine)", pytrace=False)
    pytest.skip(what)


def require_kernel(monkeypatch, name: str) -> None:
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    reason = cpu_kernels.load(name)
    if reason is not None:
        unavailable(f"the CPU kernel {name!r} could not be built here: {reason}")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_takes_panel_dtype(dtype: torch.dtype) -> bool:
    """What csrc/panel_linear.cpp should take on this CPU, from its flags alone (not from the build)."""
    flags = cpu_flags()
    if dtype == torch.float32:
        return "avx512f" in flags
    if dtype == torch.bfloat16:
        return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    return False


def require_panel_linear(monkeypatch, dtype: torch.dtype):
    """The panel kernel for `dtype`; skips where this CPU cannot take it, fails (when required) where it should."""
    require_kernel(monkeypatch, "panel_linear")
    kernel = cpu_kernels.panel_linear(dtype)
    if kernel is None:
        taken = torch.ops.bunny.panel_linear_dtypes()
        if cpu_takes_panel_dtype(dtype):
            unavailable(f"this CPU's flags take {dtype} but the panel build takes only {taken!r}")
        pytest.skip(f"this CPU's build takes {taken!r}, not {dtype} (the CPU lacks the instructions)")
    return kernel
