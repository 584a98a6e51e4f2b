"""Watch the model's Python stub processes under tritonserver and stop the server when one dies.

Triton 2.51 does not notice a dead stub (killed, out of memory, crashed in native code): the model stays READY,
every request fails with "Stub process ... is not healthy", in-flight gRPC streams hang forever, and a SIGTERM
waits the whole --exit-timeout-secs for requests that can never finish. bunny-serve runs tritonserver with
--model-control-mode=explicit so that the model can be unloaded (readiness probes then see it not ready);
then the server is stopped, and killed after a short grace so that the hung streams end with an error.
Processes are read from /proc (Linux): a stub is a child of tritonserver whose command line names the stub.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"
POLL_S = 0.5
PROBE_GRACE_S = 1.0   # readiness probes see the model unloaded before the endpoints go away
KILL_GRACE_S = 5.0    # after SIGTERM; requests held by a dead stub never finish


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2:].split()   # the command name may hold spaces and parentheses
    return (int(fields[1]), fields[0]) if len(fields) > 1 else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def child_pids(parent: int, needle: str) -> set[int]:
    """The live children of `parent` whose command line holds `needle` (a zombie has no command line left)."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _stat(int(name))
        if stat and stat[0] == parent and stat[1] not in "ZX" and needle in _cmdline(int(name)):
            found.add(int(name))
    return found


def kill_leftover_stubs(repository: Path) -> list[int]:
    """SIGKILL the stub processes of `repository` still alive after tritonserver exited: a server that stops on its
    exit timeout (a model it could not unload) leaves its stubs running, and with them any tensor-parallel
    workers (which end once their stub is gone). The repository path is unique to one bunny-serve run."""
    killed = []
    needle = str(repository)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        cmdline = _cmdline(int(name))
        if STUB_NAME in cmdline and needle in cmdline:
            try:
                os.kill(int(name), signal.SIGKILL)
                killed.append(int(name))
            except ProcessLookupError:
                pass
    return killed


def is_dead(pid: int, server_pid: int) -> bool:
    """Gone, a zombie, or no longer a child of the server (its pid reused)."""
    stat = _stat(pid)
    return stat is None or stat[1] in "ZX" or stat[0] != server_pid


def model_status(http_url: str, model: str) -> int | None:
    """The HTTP status of the model's readiness endpoint (200 ready, 400 not), None when the server is unreachable."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2/models/{model}/ready", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def unload_model(http_url: str, model: str, timeout_s: float = 5.0) -> str | None:
    """Ask the server to unload `model` (the repository API of explicit model control); an error message or None."""
    req = urllib.request.Request(f"{http_url}/v2/repository/models/{model}/unload",
                                 data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read().decode(errors='replace').strip()}"
    except Exception as e:
        return str(e)


class StubWatchdog:
    """Remembers the stub processes of a server seen since the model was ready; `dead_stub()` names one that died."""

    def __init__(self, server_pid: int, http_url: str, model: str):
        self.server_pid, self.http_url, self.model = server_pid, http_url, model
        self.stubs: set[int] = set()

    def dead_stub(self) -> int | None:
        self.stubs |= child_pids(self.server_pid, STUB_NAME)
        dead = sorted(pid for pid in self.stubs if is_dead(pid, self.server_pid))
        if not dead:
            return None
        # A crash leaves the model READY. A stub also exits when the model is unloaded: the model is then not
        # ready (forget those stubs), or the endpoints are already closed because tritonserver is stopping.
        status = model_status(self.http_url, self.model)
        if status == 200:
            return dead[0]
        if status is not None:
            self.stubs -= set(dead)
        return None   # unreachable: stopping (it exits soon) or too busy to answer (look again)


def stop_after_stub_death(proc: subprocess.Popen, pid: int, http_url: str, model: str) -> None:
    """Unload the model, stop tritonserver (`proc`), and kill it if it outlives the grace."""
    print(f"bunny-serve: the model's Python stub process (pid {pid}) died; the model cannot serve requests any "
          "more. Stopping tritonserver.", file=sys.stderr, flush=True)
    error = unload_model(http_url, model)
    if error:
        print(f"bunny-serve: could not unload the model ({error})", file=sys.stderr, flush=True)
    else:
        time.sleep(PROBE_GRACE_S)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"bunny-serve: tritonserver still running {KILL_GRACE_S:.0f}s after SIGTERM (requests held by the "
              "dead stub never finish); killing it", file=sys.stderr, flush=True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: the other stubs go with it
        except ProcessLookupError:
            pass
