"""bunny-serve's stub watchdog (backend/bunny_backend/server/watchdog.py) against the real tritonserver (marker `server`).

Killing the model's Python stub must not leave a server that reports READY while it hangs every stream: the model
is unloaded, tritonserver stopped (killed after a short grace), the in-flight stream ends with an error and
bunny-serve exits non-zero. Each test starts its own bunny-serve: the session server must stay healthy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bunny_backend.server import watchdog
from grpc_helpers import inputs_of, send
from reliability_report import record
from server_fixture import alive, start_server, stop_process, wait_for

pytestmark = pytest.mark.server
BOUND_S = 30.0   # from the kill to not-ready, to bunny-serve's exit and to the client's error


def ready_status(http_port: int) -> int | str:
    status = watchdog.model_status(f"http://127.0.0.1:{http_port}", "bunny")
    return "refused" if status is None else status


def test_proc_helpers_tell_live_children_from_zombies():
    child = subprocess.Popen(["sleep", "60"])
    try:
        # Popen can return before the kernel has set the new command line (exec releases the parent early)
        wait_for(lambda: watchdog.child_pids(os.getpid(), "sleep") == {child.pid}, 10, "the child not found")
        assert not watchdog.is_dead(child.pid, os.getpid())
        assert watchdog.is_dead(child.pid, os.getpid() + 1)   # someone else's child: a reused pid
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: watchdog.is_dead(child.pid, os.getpid()), 10, "the killed child did not show as dead")
        assert child.pid not in watchdog.child_pids(os.getpid(), "sleep")   # a zombie, not yet reaped
    finally:
        child.kill()
        child.wait()
    assert watchdog.is_dead(child.pid, os.getpid())   # reaped: gone


def server_and_stubs(server) -> tuple[int, set[int]]:
    """The pids of bunny-serve's tritonserver and of its Python stubs."""
    (tritonserver,) = wait_for(lambda: watchdog.child_pids(server.proc.pid, "tritonserver"), 10,
                               "no tritonserver under bunny-serve")
    stubs = wait_for(lambda: watchdog.child_pids(tritonserver, watchdog.STUB_NAME), 10,
                     "no Python stub under tritonserver")
    return tritonserver, stubs


def kill_the_stub_mid_stream(tiny_checkpoint, log_path) -> bool:
    """One server, its stub killed while a stream runs; the checks that hold whichever way the server ends.
    Returns whether bunny-serve's watchdog ended it (False: tritonserver aborted first)."""
    server = start_server(tiny_checkpoint, log_path)
    try:
        tritonserver, stubs = server_and_stubs(server)
        with ThreadPoolExecutor(1) as pool:
            def timed_send():
                result = send(server.url, inputs_of("Tell me a story.", stream=True, max_tokens=1900, ignore_eos=True),
                              timeout=BOUND_S)
                return result, time.monotonic()

            stream = pool.submit(timed_send)
            wait_for(lambda: server.metric("bunny_generation_tokens_total") >= 5, 60,
                     "the stream produced no tokens")
            assert not stream.done()
            stub = min(stubs)
            os.kill(stub, signal.SIGKILL)
            killed = time.monotonic()

            seen, not_ready_s = [], None   # the readiness answers in order, without repeats
            while time.monotonic() - killed < BOUND_S:
                status = ready_status(server.http_port)
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status != 200 and not_ready_s is None:
                    not_ready_s = time.monotonic() - killed
                if not_ready_s is not None and server.proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert not_ready_s is not None and seen[-1] != 200, f"still ready {BOUND_S:.0f}s after the kill: {seen}"

            rc = server.proc.wait(timeout=max(1.0, BOUND_S - (time.monotonic() - killed)))
            exited_s = time.monotonic() - killed
            (responses, err), ended = stream.result(timeout=BOUND_S)
    finally:
        stop_process(server.proc)
    log = server.log_text()
    # Either bunny-serve's watchdog saw the stub gone and stopped tritonserver, or tritonserver aborted first: a
    # stub killed while it holds one of the python backend's shared-memory locks makes Triton 2.51 throw
    # boost::interprocess::lock_exception with nobody to catch it (seen in CI). Both end with exit 1.
    watched = f"stub process (pid {stub}) died" in log and "after its Python stub died" in log
    aborted = "tritonserver was killed by signal" in log
    record("stub killed", readiness_after_kill=seen, not_ready_after_s=round(not_ready_s, 1),
           ended_by="watchdog" if watched else "tritonserver aborted" if aborted else "?", bunny_serve_exit=rc,
           exited_after_s=round(exited_s, 1), stream_error_after_s=round(ended - killed, 1),
           stream_error=repr(err)[:60])
    assert rc == 1, log[-3000:]
    assert watched or aborted, log[-3000:]
    assert responses and not responses[-1]["final"] and err is not None, (len(responses), err)
    assert ended - killed < BOUND_S
    return watched


def test_a_dead_stub_unloads_the_model_and_stops_the_server(tiny_checkpoint, tmp_path):
    """The watchdog's path must run: when tritonserver aborts first (a stub killed while it held a shared-memory
    lock; that path has its own test below), the kill is tried again on a new server, up to three servers."""
    for attempt in range(3):
        if kill_the_stub_mid_stream(tiny_checkpoint, tmp_path / f"server-{attempt}.log"):
            return
    pytest.fail("tritonserver aborted before the watchdog saw the dead stub on three servers: the watchdog's "
                "path never ran")


def test_stubs_left_behind_by_the_server_are_killed(tmp_path):
    """A tritonserver that stops on its exit timeout leaves its stubs (and their tensor-parallel workers) running."""
    repo, other = tmp_path / "bunny-repo-a" / "model_repository", tmp_path / "bunny-repo-b" / "model_repository"
    script = "import time; time.sleep(60)"
    mine = subprocess.Popen([sys.executable, "-c", script, watchdog.STUB_NAME, f"{repo}/bunny/1/model.py"])
    theirs = subprocess.Popen([sys.executable, "-c", script, watchdog.STUB_NAME, f"{other}/bunny/1/model.py"])
    try:
        wait_for(lambda: {mine.pid, theirs.pid} <= watchdog.child_pids(os.getpid(), watchdog.STUB_NAME), 10,
                 "the fake stubs did not start")
        assert watchdog.kill_leftover_stubs(repo) == [mine.pid]
        assert mine.wait(10) == -signal.SIGKILL and theirs.poll() is None
    finally:
        for p in (mine, theirs):
            p.kill()
            p.wait()


def test_a_tritonserver_that_crashes_makes_bunny_serve_exit_1(tiny_checkpoint, tmp_path):
    """Triton 2.51 can itself abort when a stub dies mid-request, before the watchdog sees the stub gone: a server
    killed by a signal is a model that died while serving (exit 1, as above), and its stubs go with it."""
    server = start_server(tiny_checkpoint, tmp_path / "server.log")
    try:
        tritonserver, stubs = server_and_stubs(server)
        os.kill(tritonserver, signal.SIGKILL)
        rc = server.proc.wait(timeout=BOUND_S)
    finally:
        stop_process(server.proc)
    log = server.log_text()
    assert rc == 1, log[-3000:]
    assert "tritonserver was killed by signal 9" in log
    wait_for(lambda: not any(alive(pid) for pid in stubs), 10, "a stub outlived its server")

