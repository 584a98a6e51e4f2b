"""Start `bunny-serve` as a child process and wait for its READY line (used by run_demo, the tests, the bench)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class LaunchError(RuntimeError):
    pass


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def die_with_parent() -> None:
    """A Popen preexec_fn: the child gets SIGTERM if its parent dies without stopping it (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def stop_process(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM, then SIGKILL to its process group (it was started with start_new_session) after timeout_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def serve_command(model_path: str | Path, ports: list[int], params: dict[str, str] | None = None,
                  extra_args: list[str] = ()) -> list[str]:
    grpc, http, metrics = ports
    cmd = [sys.executable, "-m", "bunny_backend.server.cli", "--model-path", str(model_path),
           "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics), *extra_args]
    for key, value in (params or {}).items():
        cmd += ["--param", f"{key}={value}"]
    return cmd


def launch(cmd: list[str], stderr, timeout_s: float, **popen_kwargs) -> subprocess.Popen:
    """Run `cmd` (a serve_command) and return once it printed READY; LaunchError if it exits or times out first
    (the process is then left for the caller to stop)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, **popen_kwargs)
    ready = threading.Event()

    def watch():
        for line in proc.stdout:
            if line.strip() == "READY":
                ready.set()

    threading.Thread(target=watch, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.2):
        if proc.poll() is not None:
            raise LaunchError(f"bunny-serve exited with status {proc.returncode} before the model was ready")
        if time.monotonic() > deadline:
            raise LaunchError(f"the model was not ready after {timeout_s:.0f}s")
    return proc
