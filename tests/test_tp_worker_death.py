"""A tensor-parallel worker killed (SIGKILL, as the out-of-memory killer does) makes the engine refuse to step, with
a message naming the rank, and leaves no process behind. The same through bunny-serve: test_scale_out_server.py."""
import os
import signal
import time

import pytest

from bunny_backend.engine.outputs import EngineDeadError
from bunny_backend.engine.sampling_params import SamplingParams
from engine_helpers import QUESTIONS, make_engine, run_all
from reliability_report import record
from server_fixture import wait_for


def test_a_dead_worker_makes_the_engine_refuse_to_step(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, tensor_parallel_size=2)
    try:
        run_all(engine, [(0, "before", QUESTIONS[0], [], SamplingParams(max_tokens=4))])
        worker = engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        killed = time.monotonic()

        def dead():
            try:
                engine.check_alive()
            except EngineDeadError as e:
                return str(e)
        message = wait_for(dead, 10, "check_alive() did not notice the dead worker")
        assert f"tensor-parallel rank 1 (pid {worker.pid}) was killed by SIGKILL" in message
        noticed_s = time.monotonic() - killed
        engine.add_request("after", QUESTIONS[1], [], SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError, match="rank 1"):
            engine.step()
        assert [o.error for o in engine.fail_all("down")] == ["down"]
    finally:
        engine.shutdown()
    assert not worker.is_alive()
    record("tp worker killed (engine)", noticed_after_s=round(noticed_s, 2))
