"""Where the capacity bench says a server's CPU went (bench/common.py tree_cpu_by_name): the seconds a descendant
process burnt are charged to its own name, against the kernel's own count for that child once it has ended."""
import os
import subprocess
import sys

from bench.common import tree_cpu_by_name

BURN = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"burner", 0, 0, 0)   # PR_SET_NAME: /proc/PID/comm
t = time.process_time()
while time.process_time() - t < 0.4:
    pass
print("done", flush=True)
sys.stdin.read()
"""


def test_a_child_s_cpu_is_charged_to_its_name():
    before = tree_cpu_by_name(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        seen = tree_cpu_by_name(os.getpid())
    finally:
        child.stdin.close()
        _, _, burnt = os.wait4(child.pid, 0)   # the kernel's own count for this child
        child.returncode = 0
    kernel = burnt.ru_utime + burnt.ru_stime
    assert "burner" not in before
    assert 0.35 <= seen["burner"] <= kernel + 0.02, (seen, kernel)


def test_a_gone_process_is_not_listed():
    assert tree_cpu_by_name(2 ** 22 + 7) == {}
