"""The C++ CPU kernels build once per machine: a build leaves the shared flag lists as they were, so a process
that builds them in another order (the server's stub, the tests) runs the same commands and ninja has nothing to
do. (torch appends its own flags to the lists it is given; a grown list used to rebuild every kernel at each
server start.)"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import ninja

from bunny_backend.ops import cpu_kernels
from cpu_kernel_helpers import unavailable

SCRIPT = """
import json
from bunny_backend.ops import cpu_kernels as c
before = (list(c.CFLAGS), list(c.LDFLAGS))
reasons = [c.load(name) for name in reversed(c.KERNELS)]
print(json.dumps({"reasons": reasons, "before": before, "after": [c.CFLAGS, c.LDFLAGS]}))
"""


def test_building_leaves_the_flag_lists_unchanged(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if any(result["reasons"]):
        unavailable(f"the CPU kernels do not build here: {result['reasons']}")
    assert result["after"] == result["before"]


def test_every_process_builds_with_the_pinned_ninja(monkeypatch, tmp_path):
    """Another ninja first on PATH (a system one: 1.11 hashes commands unlike the pinned 1.13, so each would take
    the other's builds for stale) is not the one the kernels build with."""
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\necho 1.0.0\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert cpu_kernels._ninja_on_path()
    assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")
