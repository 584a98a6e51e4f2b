"""Scale-out through the real tritonserver: `bunny-serve --tensor-parallel-size 2` and `--instances 2` serve 12
concurrent mixed requests with the outputs of the one-engine session server; both instances take requests (their
own metric series); a SIGKILLed tensor-parallel worker fails the requests in flight, the model goes not ready,
bunny-serve exits 1 and no process is left."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bunny_backend.server import watchdog
from grpc_helpers import TEXTS, inputs_of, joined, send
from reliability_report import record
from server_fixture import alive, start_server, stop_process, wait_for

pytestmark = pytest.mark.server
BOUND_S = 30.0


def twelve_mixed(test_images) -> list[dict]:
    """Text and image, streamed or not, 8 to 30 tokens."""
    return [inputs_of(TEXTS[i % len(TEXTS)], [test_images[i % len(test_images)]] if i % 3 else [],
                      stream=bool(i % 2), max_tokens=8 + 2 * i) for i in range(12)]


def outputs_of(url: str, requests: list[dict]) -> list[tuple[str, list[int], str]]:
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda inputs: send(url, inputs), requests))
    assert all(err is None for _, err in results), [err for _, err in results]
    return [(*joined(responses), responses[-1]["reason"]) for responses, _ in results]


@pytest.fixture(scope="module")
def tp1_outputs(bunny_server, test_images):
    return outputs_of(bunny_server.url, twelve_mixed(test_images))


def seeded_mixed(test_images) -> list[dict]:
    """Sampled with per-request seeds (temperature, top_p, top_k, repetition_penalty), text and image."""
    return [inputs_of(TEXTS[i % len(TEXTS)], [test_images[i % len(test_images)]] if i % 2 else [],
                      stream=bool(i % 3 == 0), max_tokens=20, ignore_eos=True, temperature=0.9, top_p=0.95,
                      **({"top_k": 20} if i % 2 else {"repetition_penalty": 1.2}), seed=1000 + i) for i in range(8)]


@pytest.fixture(scope="module")
def tp1_seeded(bunny_server, test_images):
    out = outputs_of(bunny_server.url, seeded_mixed(test_images))
    assert outputs_of(bunny_server.url, seeded_mixed(test_images)) == out   # the same seeds, the same tokens
    return out


@pytest.fixture(scope="module")
def tp_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("tp2") / "server.log",
                          extra_args=("--tensor-parallel-size", "2"))
    yield server
    stop_process(server.proc)   # the last test kills a worker, which ends the server itself


@pytest.fixture(scope="module")
def instances_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("instances") / "server.log",
                          extra_args=("--instances", "2"))
    yield server
    assert stop_process(server.proc) == 0, server.log_text()[-3000:]


def descendants(pid: int) -> set[int]:
    """The live processes under `pid` (tritonserver, its stub, the stub's workers and helpers)."""
    found, todo = set(), [pid]
    while todo:
        for child in watchdog.child_pids(todo.pop(), ""):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_instances_share_the_requests_with_tp1_outputs(instances_server, tp1_outputs, test_images):
    assert outputs_of(instances_server.url, twelve_mixed(test_images)) == tp1_outputs
    served = {name: instances_server.metric("bunny_requests_total", instance=name)
              for name in ("bunny_0_0", "bunny_0_1")}
    record("instances=2", requests_per_instance=served)
    assert all(n > 0 for n in served.values()) and sum(served.values()) == 12, served


def test_tensor_parallel_outputs_equal_tp1(tp_server, tp1_outputs, test_images):
    assert outputs_of(tp_server.url, twelve_mixed(test_images)) == tp1_outputs
    ranks = [line.split("bunny: ", 1)[1].rstrip('"') for line in tp_server.log_text().splitlines()
             if "bunny: tensor-parallel rank" in line]
    record("tensor-parallel-size=2 ranks", **{f"rank{i}": r.split(": ", 1)[1] for i, r in enumerate(ranks)})
    assert len(ranks) == 2


def test_seeded_sampling_is_equal_across_instances(instances_server, tp1_seeded, test_images):
    assert outputs_of(instances_server.url, seeded_mixed(test_images) * 2) == tp1_seeded * 2


def test_seeded_sampling_is_equal_under_tensor_parallelism(tp_server, tp1_seeded, test_images):
    """Rank 0 samples from logits gathered over both ranks (fp32): the same draws as one engine."""
    assert outputs_of(tp_server.url, seeded_mixed(test_images)) == tp1_seeded


def test_a_killed_worker_fails_requests_and_stops_the_server(tp_server):
    (triton,) = watchdog.child_pids(tp_server.proc.pid, "tritonserver")
    stub = tp_server.stub_pid()
    (worker,) = watchdog.child_pids(stub, "spawn_main")
    before = descendants(tp_server.proc.pid)
    assert {triton, stub, worker} <= before
    with ThreadPoolExecutor(3) as pool:
        def timed_send(i):
            result = send(tp_server.url, inputs_of(TEXTS[i], stream=bool(i % 2), max_tokens=1900, ignore_eos=True),
                          timeout=BOUND_S)
            return result, time.monotonic()

        streams = [pool.submit(timed_send, i) for i in range(3)]
        wait_for(lambda: tp_server.metric("bunny_generation_tokens_total") >= 5, 60, "no tokens generated")
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        not_ready_s = None
        while time.monotonic() - killed < BOUND_S:
            if not_ready_s is None and watchdog.model_status(f"http://127.0.0.1:{tp_server.http_port}", "bunny") != 200:
                not_ready_s = time.monotonic() - killed
            if tp_server.proc.poll() is not None:
                break
            time.sleep(0.1)
        rc = tp_server.proc.wait(timeout=max(1.0, BOUND_S - (time.monotonic() - killed)))
        exited_s = time.monotonic() - killed
        results = [s.result(timeout=BOUND_S) for s in streams]
    errors = [err for (_, err), _ in results]
    left = {p for p in before if alive(p)}
    log = tp_server.log_text()
    record("tp worker killed (server)", not_ready_after_s=not_ready_s and round(not_ready_s, 1), bunny_serve_exit=rc,
           exited_after_s=round(exited_s, 1), errors_after_s=[round(t - killed, 1) for _, t in results],
           error=repr(errors[0])[:100], processes_left=len(left))
    assert rc == 1, log[-3000:]
    assert all(err is not None and "tensor-parallel rank 1" in str(err) for err in errors), errors
    assert not_ready_s is not None
    assert f"tensor-parallel rank 1 (pid {worker}) was killed by SIGKILL" in log
    assert "after its Python stub died" in log
    assert not left, left
