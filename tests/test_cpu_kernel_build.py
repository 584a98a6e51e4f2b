"""The C++ CPU kernels build once per machine: a build leaves the shared flag lists as they were, so a process
that builds them in another order (the server's stub, the tests) runs the same commands and ninja has nothing to
do. (torch appends its own flags to the lists it is given; a grown list used to rebuild every kernel at each
server start.)"""
import json
import subprocess
import sys

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
