"""Rank 0's side of tensor parallelism: start ranks 1..N-1 (engine/executor/tp_worker.py), form the process group with
them, hand them every step, watch them, stop them.

Workers are torch.multiprocessing processes started with `spawn` (a fork of Triton's stub, threads and all, would
not be safe), rendezvousing with rank 0 on 127.0.0.1 at a free port. A monitor thread waits on their process
sentinels: when one dies (killed, out of memory, a failed step), the others are killed at once, so that no rank
waits in a collective for a peer that will never come and no process outlives the group, and `failure` names the
dead rank; every later `send` raises EngineDeadError with it.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from multiprocessing.connection import wait as wait_any
from pathlib import Path

import torch.multiprocessing as mp

from bunny_backend.engine.outputs import EngineDeadError
from bunny_backend.engine.executor.step_channel import StepChannel, StepInputs
from bunny_backend.engine.executor.tp_worker import worker_main
from bunny_backend.utils.distributed import TensorParallel, destroy_group, init_group

log = logging.getLogger("bunny.engine")
STARTUP_TIMEOUT_S = 600.0   # a worker's import and checkpoint load
STOP_TIMEOUT_S = 10.0
CAUSE_WAIT_S = 2.0          # how long a failed collective waits for the monitor to name the dead rank


def python_executable() -> str:
    """The interpreter spawned workers run: this one, unless we are embedded (Triton's stub is not python)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    venv_python = Path(sys.prefix) / "bin" / "python3"
    return str(venv_python) if venv_python.exists() else shutil.which("python3") or sys.executable


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends it too)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


class WorkerGroup:
    def __init__(self, config, plan):
        """Spawn ranks 1..N-1 and form the group (they then load their shards while rank 0 loads its own)."""
        size = config.tensor_parallel_size
        ctx = mp.get_context("spawn")
        ctx.set_executable(python_executable())
        port = _free_port()
        self.failure: str | None = None
        self._started = self._shut_down = False
        self._expected_exits = False   # set before the group kills its workers itself
        self._on_failure = []
        self.procs, self.conns = [], []
        for rank in range(1, size):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"bunny-tp-rank{rank}", daemon=True,
                               args=(rank, size, port, config.to_dict(), plan.for_rank(rank), child_conn,
                                     os.getpid()))
            proc.start()
            child_conn.close()
            self.procs.append(proc)
            self.conns.append(parent_conn)
        self.channel = StepChannel(self.conns)
        try:
            for rank in range(1, size):
                self._expect(rank, "hello")
            self.tp: TensorParallel = init_group(0, size, plan.device, port)
        except BaseException:
            self.shutdown()
            raise

    # ---- startup -------------------------------------------------------------------------------------------
    def _expect(self, rank: int, kind: str) -> tuple:
        """The next startup message of `rank`, which must be `kind`; RuntimeError naming the rank otherwise."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not conn.poll(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} {describe_exit(proc.exitcode)} while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} did not start within {STARTUP_TIMEOUT_S:.0f}s")
        try:
            message = conn.recv()
        except EOFError:
            proc.join(1.0)
            raise RuntimeError(f"tensor-parallel rank {rank} {describe_exit(proc.exitcode)} while starting") from None
        if message[0] == "error":
            raise RuntimeError(f"tensor-parallel rank {rank} failed to load:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"tensor-parallel rank {rank} said {message[0]!r}, expected {kind!r}")
        return message

    def wait_ready(self) -> list[tuple[int, dict]]:
        """Each worker's (KV blocks that fit, memory report), in rank order, once its shard is loaded."""
        try:
            return [self._expect(rank, "ready")[1:] for rank in range(1, len(self.procs) + 1)]
        except BaseException:
            self.shutdown()
            raise

    def start(self, num_blocks: int) -> None:
        """Every rank allocates num_blocks KV blocks; from now on a dead worker takes the group down."""
        for conn in self.conns:
            conn.send(num_blocks)
        self._started = True
        self._stop_r, self._stop_w = mp.get_context("spawn").Pipe(duplex=False)
        threading.Thread(target=self._monitor, name="bunny-tp-monitor", daemon=True).start()

    # ---- steps ---------------------------------------------------------------------------------------------
    def send(self, step: StepInputs) -> None:
        """Hand one step to every worker (then rank 0 runs it too). EngineDeadError once the group is down."""
        if self.failure:
            raise EngineDeadError(self.failure)
        try:
            self.channel.send(step)
        except OSError as e:   # a dead worker's pipe
            raise EngineDeadError(self.fail(e)) from e
        if step.image_embeds is not None:
            self.tp.broadcast(step.image_embeds.contiguous())

    def fail(self, error: BaseException) -> str:
        """A step failed on rank 0 after the workers had it, so the ranks are out of step: the group is done for.
        Returns why: the dead rank once the monitor has seen one (a collective fails as soon as a peer dies),
        else rank 0's own error (the workers are then killed here)."""
        deadline = time.monotonic() + CAUSE_WAIT_S
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.failure is None:
            self.failure = f"a tensor-parallel step failed on rank 0 ({type(error).__name__}: {error})"
            self._expected_exits = True
            self._kill_all()
        return self.failure

    def add_failure_callback(self, callback) -> None:
        """callback(message), from the monitor thread, when a worker dies."""
        self._on_failure.append(callback)

    # ---- watching and stopping -----------------------------------------------------------------------------
    def _monitor(self) -> None:
        ready = wait_any([p.sentinel for p in self.procs] + [self._stop_r])
        if self._stop_r in ready or self._expected_exits:
            return
        dead = next(p for p in self.procs if p.sentinel in ready)
        dead.join(1.0)
        rank = self.procs.index(dead) + 1
        self.failure = (f"tensor-parallel rank {rank} (pid {dead.pid}) {describe_exit(dead.exitcode)}; "
                        "the model cannot run without it")
        log.error("bunny: %s", self.failure)
        self._kill_all()
        for callback in self._on_failure:
            try:
                callback(self.failure)
            except Exception:   # noqa: BLE001 - a callback must not keep the others from running
                log.exception("bunny: a tensor-parallel failure callback failed")

    def _kill_all(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(STOP_TIMEOUT_S)

    def shutdown(self) -> None:
        """Stop the workers (EXIT, then SIGKILL after STOP_TIMEOUT_S) and leave the process group."""
        if self._shut_down:
            return
        self._shut_down = self._expected_exits = True
        if self._started:
            self._stop_w.send(None)
        if self._started and self.failure is None:
            try:
                self.channel.send_exit()
            except OSError:
                pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        self._kill_all()
        destroy_group()
