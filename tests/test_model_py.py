"""model_repository/bunny/1/model.py driven in-process: fake triton_python_backend_utils, fake engine."""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fake_triton
from fake_triton import FINAL, FakeEngine, MetricFamily, Request
from server_fixture import wait_for

MODEL_PY = Path(__file__).resolve().parent.parent / "model_repository" / "bunny" / "1" / "model.py"


def text(s: str) -> np.ndarray:
    return np.array([s.encode()], dtype=object)


def load_model_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_triton.make_pb_utils())
    spec = importlib.util.spec_from_file_location("bunny_model_under_test", MODEL_PY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def model(monkeypatch):
    mod = load_model_py(monkeypatch)
    monkeypatch.setattr(mod, "LLMEngine", FakeEngine)
    config = {"model_transaction_policy": {"decoupled": True},
              "parameters": {"model_path": {"string_value": "/some/ckpt"}, "max_num_seqs": {"string_value": "4"}}}
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_name": "bunny"})
    yield m
    if not m._stop.is_set():
        m.finalize()


def run(model, **inputs) -> Request:
    req = Request(**inputs)
    assert model.execute([req]) is None
    return req


def outputs(resp) -> dict:
    return {k: v.tolist() for k, v in resp.tensors.items()}


def test_parameters_reach_the_engine(model):
    assert model.engine.config.model_path == "/some/ckpt" and model.engine.config.max_num_seqs == 4


def test_non_stream_gets_one_final_response_with_everything(model):
    req = run(model, text_input=text("hello there"), max_tokens=np.array([3], np.int32)).sender.wait()
    assert len(req.responses) == 1 and req.responses[0][1] == FINAL
    out = outputs(req.responses[0][0])
    assert out["text_output"] == [b"t1 t2 t3 "] and out["output_ids"] == [1, 2, 3]
    assert out["finish_reason"] == [b"length"] and out["prompt_tokens"] == [2] and out["completion_tokens"] == [3]


def test_stream_gets_one_response_per_delta_and_the_last_is_final(model):
    model.engine.step_delay = 0.05   # a responder that keeps up sends every token in a response of its own
    req = run(model, text_input=text("hi"), max_tokens=np.array([4], np.int32), stream=np.array([True]))
    req.sender.wait()
    flags = [f for _, f in req.sender.responses]
    assert flags == [0, 0, 0, FINAL]
    outs = [outputs(r) for r, _ in req.sender.responses]
    assert b"".join(o["text_output"][0] for o in outs) == b"t1 t2 t3 t4 "
    assert sum((o["output_ids"] for o in outs), []) == [1, 2, 3, 4]
    assert [o["finish_reason"] for o in outs] == [[b""], [b""], [b""], [b"length"]]


def test_engine_keeps_stepping_while_a_send_is_slow(model):
    """Responses go out from a thread of their own: a send that waits on the server never holds up the next step."""
    req = Request(text_input=text("hi"), max_tokens=np.array([20], np.int32), stream=np.array([True]))
    req.sender.gate = threading.Event()                 # the first send blocks until the gate opens
    model.execute([req])
    wait_for(lambda: not model.engine.has_unfinished(), 5, "the engine stopped at a blocked send", poll_s=0.01)
    assert req.sender.responses == []
    req.sender.gate.set()
    req.sender.wait()
    outs = [outputs(r) for r, _ in req.sender.responses]
    # the first token went out at once; the 19 made while its send was held travel together in the final response
    assert [f for _, f in req.sender.responses] == [0, FINAL]
    assert [o["output_ids"] for o in outs] == [[1], list(range(2, 21))]
    assert outs[1]["text_output"] == ["".join(f"t{i} " for i in range(2, 21)).encode()]
    assert (outs[1]["finish_reason"], outs[1]["completion_tokens"]) == ([b"length"], [20])


def test_timeline_records_steps_and_sends(monkeypatch, tmp_path):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv("BUNNY_TIMELINE", str(path))
    mod = load_model_py(monkeypatch)
    monkeypatch.setattr(mod, "LLMEngine", FakeEngine)
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {"model_path": {"string_value": "/x"}}}
    m = mod.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_name": "bunny"})
    req = run(m, text_input=text("hi"), max_tokens=np.array([3], np.int32), stream=np.array([True]))
    req.sender.wait()
    m.finalize()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [e for e in events if e["ev"] == "step"]
    sends = [e for e in events if e["ev"] == "send"]
    assert len(steps) >= 3 and all(e["t0"] <= e["t1"] for e in steps)
    assert [(e["rid"], e["k"], e["final"]) for e in sends] == [(req.id, 1, False), (req.id, 2, False), (req.id, 3, True)]
    assert all(e["handed"] <= e["t0"] <= e["t1"] for e in sends)
    accepts = [e for e in events if e["ev"] == "accept"]
    assert [e["rid"] for e in accepts] == [req.id] and accepts[0]["t0"] <= accepts[0]["t1"] <= sends[0]["t0"]


@pytest.mark.parametrize("inputs, needle", [
    ({}, "text_input is missing"),
    ({"text_input": text("")}, "text_input is empty"),
    ({"text_input": text("hi"), "max_tokens": np.array([0], np.int32)}, "max_tokens"),
    ({"text_input": text("hi"), "messages": text('[{"role": "user", "content": "hi"}]')}, "not both"),
    ({"text_input": text("bad")}, "longer than the context"),       # refused by the engine
])
def test_bad_request_gets_one_final_error_and_others_are_unaffected(model, inputs, needle):
    good = run(model, text_input=text("ok"), max_tokens=np.array([20], np.int32))
    bad = run(model, **inputs).sender.wait()
    assert len(bad.responses) == 1 and bad.responses[0][1] == FINAL
    assert needle in bad.responses[0][0].error.message()
    good.sender.wait()
    assert outputs(good.sender.finals[0])["completion_tokens"] == [20]


@pytest.mark.parametrize("prompt, code, needle", [("busy", 14, "server busy"), ("crash", 13, "internal error")])
def test_busy_and_unexpected_refusals_carry_their_code(model, prompt, code, needle):
    req = run(model, text_input=text(prompt)).sender.wait()
    assert len(req.responses) == 1 and req.responses[0][1] == FINAL
    error = req.responses[0][0].error
    assert error.code == code and needle in error.message()
    assert outputs(run(model, text_input=text("ok"), max_tokens=np.array([2], np.int32)).sender.wait().finals[0])[
        "output_ids"] == [1, 2]


def test_a_response_that_cannot_be_built_ends_its_request_only(model, monkeypatch):
    real = model._respond

    def broken(f, ready):
        if ready.request_id == "0":
            raise ValueError("response broke")
        real(f, ready)

    monkeypatch.setattr(model, "_respond", broken)
    victim = run(model, text_input=text("x"), max_tokens=np.array([50], np.int32), stream=np.array([True]))
    other = run(model, text_input=text("y"), max_tokens=np.array([5], np.int32))
    victim.sender.wait()
    assert len(victim.sender.finals) == 1 and "response broke" in victim.sender.finals[0].error.message()
    assert outputs(other.sender.wait().finals[0])["finish_reason"] == [b"length"]
    assert model._thread.is_alive() and model._responder.is_alive()


def test_cancelled_request_is_aborted_and_still_gets_a_final(model):
    victim = run(model, text_input=text("x"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
    other = run(model, text_input=text("y"), max_tokens=np.array([30], np.int32))
    victim.sender.wait_for_responses(1)   # both accepted and stepping
    victim.sender.cancelled = True
    victim.sender.wait()
    assert len(victim.sender.finals) == 1
    assert outputs(victim.sender.finals[0])["finish_reason"] == [b"cancelled"]
    assert outputs(other.sender.wait().finals[0])["finish_reason"] == [b"length"]


def test_a_request_cancelled_while_the_engine_accepts_it_is_still_aborted(model, monkeypatch):
    """The engine drops an abort for a request it does not know yet: the adapter asks only once it does."""
    monkeypatch.setattr(sys.modules["bunny_model_under_test"], "CANCEL_SWEEP_S", 1e-6)   # ask every sender each tick
    other = run(model, text_input=text("y"), max_tokens=np.array([100000], np.int32))   # the engine keeps stepping
    model.engine.accept_delay = 0.2
    req = Request(text_input=text("x"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
    req.sender.cancelled = True
    assert model.execute([req]) is None
    req.sender.wait()
    assert [outputs(r)["finish_reason"] for r in req.sender.finals] == [[b"cancelled"]]
    other.sender.cancelled = True
    other.sender.wait()


def test_a_cancelled_stream_gets_no_more_tokens_only_its_final(model):
    """Tokens the engine makes before it takes the abort in go nowhere: sending each to a client that is gone would
    hold up everyone else's responses (and the metrics behind them)."""
    model.engine.hold_aborts = True
    req = run(model, text_input=text("x"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
    wait_for(lambda: len(req.sender.responses) >= 3, 10, "no tokens streamed")
    req.sender.cancelled = True
    wait_for(lambda: all(f.cancelled for f in model._inflight.values()), 10, "the cancellation was not seen",
             poll_s=0.005)
    # What was handed to the responder before the cancellation was seen goes out; then nothing more, although
    # the engine goes on making tokens for the request (its abort is held).
    model.engine.wait_for_steps(3)
    wait_for(lambda: model._handover.idle(), 10, "the responder did not drain", poll_s=0.005)
    sent = len(req.sender.responses)
    model.engine.wait_for_steps(10)
    wait_for(lambda: model._handover.idle(), 10, "the responder did not drain", poll_s=0.005)
    assert len(req.sender.responses) == sent and len(model.engine.requests) == 1   # still running
    model.engine.hold_aborts = False
    req.sender.wait()
    assert [outputs(r)["finish_reason"] for r in req.sender.finals] == [[b"cancelled"]]


def test_no_sender_is_asked_about_cancellation_after_its_final(model, monkeypatch):
    """execute() refuses a request it had registered while the engine thread asks the senders in flight."""
    monkeypatch.setattr(sys.modules["bunny_model_under_test"], "CANCEL_SWEEP_S", 1e-6)   # ask every sender each tick
    model.engine.refuse_delay = 0.002
    slow = Request(text_input=text("x"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
    slow.sender.ask_delay_s = 0.005   # the refused one is asked after it, once its final is out
    assert model.execute([slow]) is None
    refused = [run(model, text_input=text("bad")) for _ in range(40)]
    for req in refused:
        assert len(req.sender.wait().finals) == 1
    slow.sender.cancelled = True
    slow.sender.wait()
    assert [r.sender.asked_after_final for r in refused] == [0] * len(refused)


def test_each_sweep_asks_every_sender_once_per_period_in_turn(model, monkeypatch):
    """is_cancelled() is a round trip to the server process: the responder asks the live senders in turn, so many
    that each is asked once per CANCEL_SWEEP_S whatever the load, spread over its ticks."""
    mod = sys.modules["bunny_model_under_test"]
    monkeypatch.setattr(mod, "CANCEL_SWEEP_S", 1000.0)   # the time a sweep covers is the time set below, exactly
    sweep, model._sweep_cancellations = model._sweep_cancellations, lambda: None   # the responder's sweeps stop
    reqs = [run(model, text_input=text(f"r{i}"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
            for i in range(7)]
    wait_for(lambda: len(model._inflight) == len(reqs) and all(f.accepted for f in model._inflight.values()), 10,
             "the requests were not accepted")
    before = [r.sender.asks for r in reqs]
    for _ in range(7):   # seven sweeps over 3/10 of a period each: ceil(2.1) = 3 asks each, 21 in all, in turn
        model._last_sweep = time.monotonic() - 300.0
        sweep()
    assert [r.sender.asks - b for r, b in zip(reqs, before)] == [3] * 7
    model._last_sweep = time.monotonic() - 5000.0   # a sweep after a long gap asks each sender once, no more
    sweep()
    assert [r.sender.asks - b for r, b in zip(reqs, before)] == [4] * 7
    reqs[-1].sender.cancelled = True
    model._last_sweep = time.monotonic() - 5000.0
    sweep()
    reqs[-1].sender.wait()
    assert [outputs(r)["finish_reason"] for r in reqs[-1].sender.finals] == [[b"cancelled"]]


def test_engine_exception_fails_in_flight_requests_and_keeps_serving(model):
    model.engine.step_delay = 0.01
    a = run(model, text_input=text("a"), max_tokens=np.array([100000], np.int32))
    b = run(model, text_input=text("b"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
    b.sender.wait_for_responses(1)   # both accepted and stepping
    model.engine.fail_next_step = True
    for req in (a, b):
        req.sender.wait()
        assert len(req.sender.finals) == 1 and "engine error: RuntimeError: boom" in req.sender.finals[0].error.message()
    after = run(model, text_input=text("c"), max_tokens=np.array([2], np.int32)).sender.wait()
    assert outputs(after.finals[0])["output_ids"] == [1, 2]
    assert model._thread.is_alive()


def test_finalize_gives_every_request_in_flight_its_final(model):
    reqs = [run(model, text_input=text("z"), max_tokens=np.array([100000], np.int32), stream=np.array([s]))
            for s in (True, False, True)]
    reqs[2].sender.wait_for_responses(1)   # all three accepted (in order) and stepping
    model.finalize()
    assert not model._thread.is_alive()
    for req in reqs:
        assert req.sender.done.is_set() and len(req.sender.finals) == 1
        assert outputs(req.sender.finals[0])["finish_reason"] == [b"cancelled"]


def test_metrics_move(model):
    run(model, text_input=text("a b c"), max_tokens=np.array([5], np.int32)).sender.wait()
    run(model, text_input=text("")).sender.wait()
    fams = MetricFamily.families
    error = next(m for m in fams["bunny_requests_total"].metrics if m.labels["finish_reason"] == "error")
    wait_for(lambda: error.value >= 1, 5, "the refused request not counted", poll_s=0.02)
    by_reason = {m.labels["finish_reason"]: m.value for m in fams["bunny_requests_total"].metrics}
    assert by_reason == {"stop": 0, "length": 1, "cancelled": 0, "error": 1}
    assert fams["bunny_generation_tokens_total"].metrics[0].value == 5
    value = lambda name, **labels: next(m.value for m in fams[name].metrics   # noqa: E731
                                        if all(m.labels.get(k) == v for k, v in labels.items()))
    # published as Prometheus histogram series, counted exactly: one TTFT of 10 ms, four gaps of 2 ms
    assert (value("bunny_time_to_first_token_seconds_count"), value("bunny_time_to_first_token_seconds_sum")) == (
        1, pytest.approx(0.01))
    assert [value("bunny_time_to_first_token_seconds_bucket", le=le) for le in ("0.01", "0.025", "+Inf")] == [1, 1, 1]
    assert (value("bunny_inter_token_latency_seconds_count"), value("bunny_inter_token_latency_seconds_sum")) == (
        4, pytest.approx(0.008))
    assert [value("bunny_inter_token_latency_seconds_bucket", le=le) for le in ("0.001", "0.0025", "+Inf")] == [
        0, 4, 4]
    assert fams["bunny_kv_blocks_total"].metrics[0].value == 64


def test_a_final_response_comes_after_the_counters_it_implies(model, monkeypatch):
    """A client that reads /metrics once its request has ended finds that request's tokens counted."""
    monkeypatch.setattr(sys.modules["bunny_model_under_test"], "STATS_PERIOD_S", 1000.0)
    # the periodic publication already scheduled has passed once the next is far off
    wait_for(lambda: model._next_stats > time.monotonic() + 100, 10, "no publication after the patch", poll_s=0.01)
    run(model, text_input=text("a b c"), max_tokens=np.array([5], np.int32)).sender.wait()
    assert MetricFamily.families["bunny_generation_tokens_total"].metrics[0].value == 5


def test_gauges_are_set_only_when_they_change():
    """Every set is a round trip to the server process."""
    from bunny_backend.engine.outputs import EngineStats
    from bunny_backend.stub.metrics import BunnyMetrics
    metrics = BunnyMetrics(fake_triton.make_pb_utils(), instance="bunny_gauges")
    stats = EngineStats()
    stats.num_running, stats.kv_blocks_total = 3, 64
    for _ in range(3):
        metrics.on_stats(stats)
    stats.num_running = 4
    metrics.on_stats(stats)
    assert (metrics.gauges["num_running"].value, metrics.gauges["num_running"].sets) == (4, 2)
    assert (metrics.gauges["kv_blocks_total"].value, metrics.gauges["kv_blocks_total"].sets) == (64, 1)


def test_encoder_metrics_follow_the_engine(model):
    st = model.engine.st
    st.encoder_images_total, st.encoder_seconds_total, st.encoder_cache_bytes = 3, 0.25, 4096
    st.encoder_cache_hits, st.encoder_cache_misses = 2, 3
    run(model, text_input=text("a b c"), max_tokens=np.array([2], np.int32)).sender.wait()
    value = lambda name: MetricFamily.families[name].metrics[0].value   # noqa: E731
    wait_for(lambda: value("bunny_encoder_seconds_total") == 0.25, 5, "encoder metrics not published", poll_s=0.02)
    assert (value("bunny_encoder_images_total"), value("bunny_encoder_cache_hits_total"),
            value("bunny_encoder_cache_misses_total"), value("bunny_encoder_cache_bytes")) == (3, 2, 3, 4096)


def test_model_path_is_required(monkeypatch):
    mod = load_model_py(monkeypatch)
    config = {"model_transaction_policy": {"decoupled": True}, "parameters": {"model_path": {"string_value": ""}}}
    with pytest.raises(ValueError, match="model_path is empty"):
        mod.TritonPythonModel().initialize({"model_config": json.dumps(config)})


def _load_config():
    return json.dumps({"model_transaction_policy": {"decoupled": True},
                       "parameters": {"model_path": {"string_value": "/x"}}})


def test_a_stub_that_garbles_bytes_is_refused_at_load_with_a_reason(monkeypatch):
    """Triton 2.51's stub under numpy 2 reads a tensor's raw memory with the wrong item size: BYTES inputs come out
    garbled and the stub dies on the first request. Refuse to load instead, saying why."""
    mod = load_model_py(monkeypatch)
    monkeypatch.setattr(mod, "LLMEngine", FakeEngine)
    monkeypatch.setattr(np, "__version__", "2.5.2")
    fake_triton.Tensor.raw_memory_reads_as = staticmethod(lambda a: a.astype(np.uint32).view(np.uint8))
    with pytest.raises(RuntimeError, match=r"cannot read BYTES tensors with numpy 2\.5\.2 .*needs numpy < 2"):
        mod.TritonPythonModel().initialize({"model_config": _load_config()})


def test_numpy_2_with_a_stub_that_reads_bytes_loads(monkeypatch):
    """A newer Triton (24.11 and later) reads BYTES under numpy 2: its version alone is no reason to refuse."""
    mod = load_model_py(monkeypatch)
    monkeypatch.setattr(mod, "LLMEngine", FakeEngine)
    monkeypatch.setattr(np, "__version__", "2.5.2")
    m = mod.TritonPythonModel()
    m.initialize({"model_config": _load_config()})
    try:
        assert run(m, text_input=text("a b"), max_tokens=np.array([2], np.int32)).sender.wait().finals[0].error is None
    finally:
        m.finalize()


def test_a_dead_engine_fails_what_is_in_flight_refuses_the_rest_and_ends_the_process(model, monkeypatch):
    """A tensor-parallel worker died: errors for every request, the workers stopped, the stub process ended (so
    that bunny-serve's watchdog takes the model down)."""
    mod = sys.modules["bunny_model_under_test"]
    ended = []
    monkeypatch.setattr(mod.os, "_exit", lambda status: ended.append(status))
    monkeypatch.setattr(mod, "EXIT_GRACE_S", 0.0)
    streams = [run(model, text_input=text(f"s{i}"), max_tokens=np.array([100000], np.int32), stream=np.array([True]))
               for i in range(2)]
    wait_for(lambda: all(s.sender.responses for s in streams), 5, "the streams did not start")
    model.engine.dead = "tensor-parallel rank 1 (pid 9) was killed by SIGKILL"
    for s in streams:
        s.sender.wait()
        assert "model unavailable: tensor-parallel rank 1 (pid 9)" in s.sender.finals[0].error.message()
    wait_for(lambda: ended == [1], 5, "the process was not ended with status 1")
    assert model.engine.shut_down
    late = run(model, text_input=text("late")).sender.wait()
    assert late.finals[0].error.code == 14 and "model unavailable" in late.finals[0].error.message()
