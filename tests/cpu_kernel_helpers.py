"""The C++ CPU kernels' tests: build and load one (BUNNY_CPU_KERNELS unset for the test), or skip naming why not."""
import pytest

from bunny_backend.ops import cpu_kernels


def require_kernel(monkeypatch, name: str) -> None:
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    reason = cpu_kernels.load(name)
    if reason is not None:
        pytest.skip(f"the CPU kernel {name!r} could not be built here: {reason}")
