"""A real tritonserver for the tests, started once per session through `bunny-serve` on free ports.

Import `bunny_server` (and `tiny_checkpoint` comes from conftest) into a test module to use it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import fault_injection
from bunny_backend.server import watchdog
from bunny_backend.server.launch import LaunchError, free_ports, launch, serve_command, stop_process

# Small KV cache and batch limits shared by the server and the in-process engine the tests compare with.
SERVER_PARAMS = {"kv_cache_memory_bytes": str(8 << 20), "max_num_seqs": "16", "num_threads": "2"}
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")
IDLE_GAUGES = ("bunny_kv_blocks_used", "bunny_num_requests_running", "bunny_num_requests_waiting")


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
    """predicate()'s first truthy value; the test fails with `what` if none comes within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"{what} within {timeout_s:.0f}s")


@dataclass
class BunnyServer:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int
    model_path: Path
    log: Path
    openai_port: int | None = None

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(name, '{labels}'): value} from the Prometheus endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = _METRIC_LINE.match(line)
            if m:
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
        return out

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        want = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(v for (n, lab), v in self.metrics().items() if n == name and all(w in lab for w in want))

    def wait_until_idle(self, timeout_s: float = 30.0) -> dict[str, float]:
        """The KV and queue gauges once all are 0, or as they stand after timeout_s (the caller asserts)."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = {n: self.metric(n) for n in IDLE_GAUGES}
            if not any(values.values()) or time.monotonic() > deadline:
                return values
            time.sleep(0.1)

    def thread_stacks(self) -> str:
        """Every thread's Python stack in the model's stub (it dumps them to the log on SIGUSR1), for a test that
        found the server stuck."""
        before = len(self.log_text())
        os.kill(self.stub_pid(), signal.SIGUSR1)
        time.sleep(1.0)
        return self.log_text()[before:]

    def stub_pid(self) -> int:
        """The pid of the model's python stub (tritonserver's child, itself bunny-serve's child)."""
        for triton in watchdog.child_pids(self.proc.pid, "tritonserver"):
            for pid in watchdog.child_pids(triton, watchdog.STUB_NAME):
                return pid
        raise RuntimeError("no triton_python_backend_stub process found")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def alive(pid: int) -> bool:
    """A process that exists and is neither a zombie nor dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(model_path: Path, log: Path, params: dict[str, str] = SERVER_PARAMS,
                 timeout_s: float = 120.0, openai: bool = False, extra_args: tuple[str, ...] = ()) -> BunnyServer:
    """bunny-serve on free ports (and the OpenAI API with `openai`; more bunny-serve flags in extra_args); the
    reliability tests' fault injector is installed (tests/fault_injection.py)."""
    grpc, http, metrics, openai_port = free_ports(4)
    # float32: tests compare tokens exactly; dtype auto may pick bf16 on CPUs that have it natively
    extra = ["--device", "cpu", "--dtype", "float32", *extra_args]
    extra += ["--openai-port", str(openai_port)] if openai else []
    cmd = serve_command(model_path, [grpc, http, metrics], params, extra_args=extra)
    log_file = open(log, "w")
    hooks_var, hooks = fault_injection.ENGINE_HOOKS
    env = {**os.environ, hooks_var: hooks}
    try:
        proc = launch(cmd, log_file, timeout_s, start_new_session=True, env=env)
    except LaunchError as e:
        pytest.fail(f"bunny-serve did not become ready ({e}):\n{log.read_text(errors='replace')[-4000:]}")
    return BunnyServer(proc, grpc, http, metrics, Path(model_path), log, openai_port if openai else None)


@pytest.fixture(scope="session")
def bunny_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("triton") / "server.log")
    yield server
    rc = stop_process(server.proc)
    assert rc == 0, f"bunny-serve exited with {rc} on SIGTERM:\n{server.log_text()[-3000:]}"
