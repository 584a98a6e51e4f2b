"""model_repository/bunny/1/model.py driven in-process (fake triton_python_backend_utils, fake engine): requests,
responses, streaming and cancellation. Load checks, failures, unload and metrics: test_model_py_lifecycle.py."""
from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest

from fake_triton import FINAL, FakeEngine, Request
from model_py_helpers import load_model_py, model, outputs, run, text  # noqa: F401 - model is a fixture
from server_fixture import wait_for


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
