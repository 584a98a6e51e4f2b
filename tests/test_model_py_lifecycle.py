"""model_repository/bunny/1/model.py driven in-process: failures of the engine, unload, metrics, and the checks
at load (model path, BYTES round trip)."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

import fake_triton
from fake_triton import FakeEngine, MetricFamily
from model_py_helpers import load_model_py, model, outputs, run, text  # noqa: F401 - model is a fixture
from server_fixture import wait_for


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
        error = s.sender.finals[0].error   # tagged unavailable (the front's 503), not internal
        assert error.message().startswith("[unavailable] model unavailable: tensor-parallel rank 1 (pid 9)")
        assert error.code == 14
    wait_for(lambda: ended == [1], 5, "the process was not ended with status 1")
    assert model.engine.shut_down
    late = run(model, text_input=text("late")).sender.wait()
    assert late.finals[0].error.code == 14 and "model unavailable" in late.finals[0].error.message()
