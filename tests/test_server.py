"""System tests through the real tritonserver (bunny-serve on free ports, gRPC streaming, metrics endpoint)."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from model_helpers import expected_prompt_tokens, stop_cases
from grpc_helpers import TEXTS, inputs_of, joined, send
from server_fixture import SERVER_PARAMS, free_ports, stop_process, wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The same engine in-process, to run requests one by one."""
    kw = {k: int(v) for k, v in SERVER_PARAMS.items() if k != "num_threads"}
    return LLMEngine(EngineConfig(model_path=str(tiny_checkpoint), device="cpu", dtype="float32", **kw))


def alone(engine, text, images=(), **params) -> tuple[str, list[int], str]:
    engine.add_request("alone", text, list(images), SamplingParams(**params))
    text_out, ids, reason = "", [], None
    while engine.has_unfinished():
        for out in engine.step():
            text_out, ids, reason = text_out + out.delta_text, ids + out.delta_token_ids, out.finish_reason
    return text_out, ids, reason


def test_greedy_chat_with_image_matches_the_engine(bunny_server, engine, test_images):
    responses, err = send(bunny_server.url, inputs_of(TEXTS[0], [test_images[0]], max_tokens=24))
    assert err is None and len(responses) == 1 and responses[0]["final"]
    r = responses[0]
    want_text, want_ids, want_reason = alone(engine, TEXTS[0], [test_images[0]], max_tokens=24)
    assert (r["text"], r["ids"], r["reason"]) == (want_text, want_ids, want_reason)
    assert r["completion"] == len(want_ids)
    assert r["prompt"] == expected_prompt_tokens(bunny_server.model_path, TEXTS[0], 1)   # template + image rows
    # and the transformers-composed reference (issue "Bunny in PyTorch") gives the same ids
    from bunny_backend.io.tokenizer import load_tokenizer
    from bunny_backend.tools.reference import ReferenceBunny
    ref, tok = ReferenceBunny.from_pretrained(bunny_server.model_path), load_tokenizer(bunny_server.model_path)
    assert ref.chat(tok, TEXTS[0], test_images[0], max_new_tokens=24)[0] == r["ids"]


def test_stream_deltas_concatenate_to_the_non_stream_result(bunny_server, test_images):
    kw = dict(max_tokens=40, ignore_eos=True)
    whole, err = send(bunny_server.url, inputs_of(TEXTS[1], [test_images[1]], **kw))
    assert err is None
    deltas, err = send(bunny_server.url, inputs_of(TEXTS[1], [test_images[1]], stream=True, **kw))
    assert err is None and len(deltas) > 1
    assert [r["final"] for r in deltas] == [False] * (len(deltas) - 1) + [True]
    assert joined(deltas) == (whole[0]["text"], whole[0]["ids"]) and len(whole[0]["ids"]) == 40
    assert all(r["reason"] == "" for r in deltas[:-1]) and deltas[-1]["reason"] == whole[0]["reason"] == "length"
    assert deltas[-1]["completion"] == 40 and deltas[-1]["prompt"] == whole[0]["prompt"]


def test_16_concurrent_streams_match_one_by_one(bunny_server, engine, test_images):
    reqs = [(TEXTS[i % len(TEXTS)], [test_images[i % len(test_images)]] if i % 3 else [], 8 + 3 * i)
            for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: send(bunny_server.url, inputs_of(r[0], r[1], stream=True, max_tokens=r[2])),
                                reqs))
    for (text, images, max_tokens), (responses, err) in zip(reqs, results):
        assert err is None
        want_text, want_ids, want_reason = alone(engine, text, images, max_tokens=max_tokens)
        assert joined(responses) == (want_text, want_ids) and responses[-1]["reason"] == want_reason


BAD = [
    (dict(max_tokens=4), "text_input"),
    (dict(text=""), "text_input is empty"),
    (dict(text="hi", images=[b"not an image"]), "image"),
    (dict(text="hi", images=["A", "B"]), "at most 1"),
    (dict(text="word " * 3000), "longer than the model's context"),
    (dict(text="hi", max_tokens=0), "max_tokens must be >= 1"),
    (dict(text="hi", temperature=-1.0), "temperature must be >= 0"),
    (dict(text="hi", top_p=0.0), "top_p must be in (0, 1]"),
    (dict(text="hi", top_p=1.5), "top_p must be in (0, 1]"),
    (dict(text="hi", top_k=-1), "top_k must be >= 0"),
]


def test_bad_requests_get_errors_while_a_good_one_completes(bunny_server, test_images):
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(send, bunny_server.url,   # long enough to outlast the first bad request
                           inputs_of(TEXTS[3], [test_images[2]], stream=True, max_tokens=1500, ignore_eos=True))
        running_at_first_refusal = None
        for kw, needle in BAD:
            kw = dict(kw)
            if "images" in kw:
                kw["images"] = [x.encode() if isinstance(x, str) else x for x in kw["images"]]
            responses, err = send(bunny_server.url, inputs_of(**kw))
            assert responses == [] and err is not None and needle in err, (kw, err)
            if running_at_first_refusal is None:
                running_at_first_refusal = not good.done()
        # Only the first refusal is timed against the good stream: how many of the rest land before its 1500th
        # token depends on the machine's speed, not on the server's behaviour.
        assert running_at_first_refusal, "the good request should still be running while bad ones are refused"
        responses, err = good.result()
    assert err is None and responses[-1]["completion"] == 1500 and len(joined(responses)[1]) == 1500


def test_cancelled_stream_frees_its_blocks_and_others_finish(bunny_server):
    before = bunny_server.metric("bunny_requests_total", finish_reason="cancelled")
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(send, bunny_server.url, inputs_of(TEXTS[4], stream=True, max_tokens=100, ignore_eos=True))
        responses, err = send(bunny_server.url, inputs_of(TEXTS[5], stream=True, max_tokens=1900, ignore_eos=True),
                              cancel_after=3)
        assert err == "cancelled by the test" and len(responses) == 3
        o_responses, o_err = other.result()
    assert o_err is None and o_responses[-1]["completion"] == 100
    wait_for(lambda: bunny_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1
             and bunny_server.metric("bunny_kv_blocks_used") == 0, 20, "the cancellation not counted and freed")
    assert bunny_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1
    assert bunny_server.metric("bunny_kv_blocks_used") == 0
    assert bunny_server.metric("bunny_num_requests_running") == 0


def test_metrics_counters_move(bunny_server):
    names = ["bunny_generation_tokens_total", "bunny_prompt_tokens_total", "bunny_time_to_first_token_seconds_count",
             "bunny_inter_token_latency_seconds_count"]
    before = {n: bunny_server.metric(n) for n in names}
    length_before = bunny_server.metric("bunny_requests_total", finish_reason="length")
    errors_before = bunny_server.metric("bunny_requests_total", finish_reason="error")
    responses, err = send(bunny_server.url, inputs_of(TEXTS[6], max_tokens=10, ignore_eos=True))
    assert err is None
    assert send(bunny_server.url, inputs_of("hi", top_k=-1))[1] is not None
    wait_for(lambda: bunny_server.metric("bunny_requests_total", finish_reason="error") > errors_before, 10,
             "the refused request not counted")
    after = {n: bunny_server.metric(n) for n in names}
    assert after["bunny_generation_tokens_total"] - before["bunny_generation_tokens_total"] == 10
    assert after["bunny_prompt_tokens_total"] - before["bunny_prompt_tokens_total"] == responses[0]["prompt"]
    assert after["bunny_time_to_first_token_seconds_count"] == before["bunny_time_to_first_token_seconds_count"] + 1
    assert after["bunny_inter_token_latency_seconds_count"] == before["bunny_inter_token_latency_seconds_count"] + 9
    assert bunny_server.metric("bunny_requests_total", finish_reason="length") == length_before + 1
    assert bunny_server.metric("bunny_requests_total", finish_reason="error") == errors_before + 1
    assert bunny_server.metric("bunny_kv_blocks_total") > 0


def test_bunny_serve_refuses_a_missing_model_path():
    """Refused up front, as a usage error (exit 2) in one line, before any tritonserver is started."""
    r = subprocess.run([sys.executable, "-m", "bunny_backend.server.cli", "--model-path", "/nonexistent"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "bunny-serve: model path '/nonexistent' does not exist or is not a folder"


def test_bunny_serve_exits_with_the_load_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    ports = [str(p) for p in free_ports(3)]
    proc = subprocess.Popen([sys.executable, "-m", "bunny_backend.server.cli", "--model-path", str(broken),
                             "--device", "cpu", "--grpc-port", ports[0], "--http-port", ports[1],
                             "--metrics-port", ports[2]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        stop_process(proc)
    assert proc.returncode != 0 and "READY" not in out
    assert "failed to load" in err and str(broken) in err


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_cut_the_text_and_keep_the_ids(bunny_server, stream):
    """A stop string that spans tokens ends the request before it, finish_reason stop, its tokens in output_ids and
    completion_tokens; a stop string that matches only in part is held back and then released, unchanged."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(bunny_server.model_path))
    kw = dict(max_tokens=40, ignore_eos=True)
    free, err = send(bunny_server.url, inputs_of(TEXTS[3], **kw))
    assert err is None and free[0]["reason"] == "length"
    for stop, want_text, want_ids, want_reason in stop_cases(tokenizer, free[0]["text"], free[0]["ids"]):
        responses, err = send(bunny_server.url, inputs_of(TEXTS[3], stream=stream, stop=[stop, "never seen"], **kw))
        assert err is None and responses[-1]["final"] and all(not r["final"] for r in responses[:-1])
        text, ids = joined(responses)
        assert (text, ids, responses[-1]["reason"]) == (want_text, want_ids, want_reason), stop
        assert responses[-1]["completion"] == len(want_ids)
        assert stream or len(responses) == 1
