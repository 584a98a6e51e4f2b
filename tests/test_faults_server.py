"""Faults on the shared server: a request that breaks the engine step, and a client that vanishes mid-stream."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fault_injection
from grpc_helpers import TEXTS, error_kind, inputs_of, joined, send_raw
from reliability_report import record
from server_fixture import wait_for

pytestmark = pytest.mark.server

CLIENT_SCRIPT = """
import sys, queue, numpy as np, tritonclient.grpc as g
from tritonclient.utils import np_to_triton_dtype
c = g.InferenceServerClient(sys.argv[1]); q = queue.Queue()
c.start_stream(callback=lambda result, error: q.put((result, error)))
ins = []
for name, a in [("text_input", np.array([b"Tell me a story."], dtype=object)), ("stream", np.array([True])),
                ("max_tokens", np.array([1900], dtype=np.int32)), ("ignore_eos", np.array([True]))]:
    t = g.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype)); t.set_data_from_numpy(a); ins.append(t)
c.async_stream_infer("bunny", ins)
while True:
    r, e = q.get(timeout=60)
    print("error" if e else "token", flush=True)
"""


def test_a_request_that_breaks_the_step_fails_alone(bunny_server):
    # 150 tokens of the tiny model take ~0.1 s, so one witness is slowed (test hook: 0.1 s per step it is in,
    # 2 s in all): the witnesses are still decoding when the faulty request joins their batch.
    witnesses = [inputs_of(TEXTS[i], stream=i % 2 == 0, max_tokens=150, ignore_eos=True) for i in range(3)]
    witnesses.append(inputs_of(TEXTS[3] + " " + fault_injection.SLOW_MARKER, max_tokens=20, ignore_eos=True))
    with ThreadPoolExecutor(5) as pool:
        calm = [joined(r[0]) for r in pool.map(lambda x: send_raw(bunny_server.url, x), witnesses)]
        futures = [pool.submit(send_raw, bunny_server.url, x) for x in witnesses]
        wait_for(lambda: bunny_server.metric("bunny_num_requests_running") >= len(witnesses), 30,
                 "the witnesses not running", poll_s=0.01)
        bad_responses, bad_error = send_raw(bunny_server.url, inputs_of(
            "Hello " + fault_injection.FAULT_MARKER, stream=True, max_tokens=40, ignore_eos=True))
        stormy = [f.result() for f in futures]
    assert error_kind(bad_error) == "engine_error" and "InjectedFault" in str(bad_error)
    assert len(joined(bad_responses)[1]) <= fault_injection.FAULT_AFTER_TOKENS   # the tokens before the fault
    assert all(e is None for _, e in stormy) and [joined(r) for r, _ in stormy] == calm
    assert not any(bunny_server.wait_until_idle().values())
    failed_batches = re.findall(r"step of (\d+) sequence\(s\) failed", bunny_server.log_text())
    record("injected engine fault", failed_steps=failed_batches, witnesses_unchanged=len(stormy))
    assert failed_batches and int(failed_batches[0]) > 1, "the fault should have hit a batch, not a lone request"
    ok = send_raw(bunny_server.url, inputs_of("Still there?", max_tokens=4))
    assert ok[1] is None and ok[0][-1]["completion"] == 4


def test_a_client_killed_mid_stream_frees_its_sequence(bunny_server):
    before = bunny_server.metric("bunny_requests_total", finish_reason="cancelled")
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, bunny_server.url], stdout=subprocess.PIPE,
                              text=True)
    try:
        for _ in range(3):
            assert client.stdout.readline().strip() == "token"
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    t0 = time.monotonic()
    wait_for(lambda: bunny_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1, 30,
             "the killed client's request not cancelled")
    freed_after = time.monotonic() - t0
    idle = bunny_server.wait_until_idle()
    record("client killed mid-stream", freed_after_s=round(freed_after, 2), after=idle)
    assert bunny_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1
    assert not any(idle.values())
