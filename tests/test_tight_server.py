"""A server with a tiny KV cache and tight limits (config.pbtxt parameters through bunny-serve --param)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bunny_backend.config import EngineConfig
import fault_injection
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from grpc_helpers import TEXTS, error_kind, inputs_of, joined, send_raw
from reliability_report import record
from server_fixture import start_server, stop_process, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]
BLOCK_BYTES = 2 * 2 * 2 * 16 * 16 * 4   # K and V, 2 layers, 2 KV heads, head_dim 16, 16 tokens, fp32
TIGHT = {"kv_cache_memory_bytes": str(48 * BLOCK_BYTES), "max_num_seqs": "16", "max_queued_requests": "16",
         "num_threads": "2", "max_output_tokens": "160", "max_image_bytes": "200000", "max_prompt_tokens": "300",
         "max_text_bytes": "4096"}


@pytest.fixture(scope="module")
def tight_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("tight") / "server.log", params=TIGHT)
    yield server
    assert stop_process(server.proc) == 0, server.log_text()[-3000:]


def one_by_one(model_path, requests) -> list[list[int]]:
    """Each request alone: added to an engine only once the one before it finished, so that every step holds one
    sequence (asserted); no prefix cache, so nothing of one request's run reaches the next."""
    engine = LLMEngine(EngineConfig(model_path=str(model_path), device="cpu", dtype="float32",
                                    kv_cache_memory_bytes=8 << 20, enable_prefix_caching=False))
    schedule = engine.scheduler.schedule
    widest = []

    def recording():
        step = schedule()
        widest.append(len(step.seqs))
        return step

    engine.scheduler.schedule = recording
    got = []
    for i, (text, max_tokens) in enumerate(requests):
        engine.add_request(str(i), text, [], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        ids = []
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == str(i)
                ids += out.delta_token_ids
        got.append(ids)
    assert max(widest) == 1, "the reference ran more than one sequence in a step"
    return got


def in_flight(server) -> float:
    return server.metric("bunny_num_requests_running") + server.metric("bunny_num_requests_waiting")


def test_kv_exhaustion_32_long_requests_all_complete(tight_server, tiny_checkpoint):
    assert tight_server.metric("bunny_kv_blocks_total") == 48
    requests = [(f"{TEXTS[i % len(TEXTS)]} ({i})", 100 + i) for i in range(32)]
    preempted_before = tight_server.metric("bunny_preemptions_total")
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda r: send_raw(tight_server.url, inputs_of(r[0], stream=True, max_tokens=r[1],
                                                                                ignore_eos=True)), requests))
    assert [error for _, error in results] == [None] * 32
    got = [joined(responses)[1] for responses, _ in results]
    assert got == one_by_one(tiny_checkpoint, requests)
    preemptions = tight_server.metric("bunny_preemptions_total") - preempted_before
    idle = tight_server.wait_until_idle()
    record("KV exhaustion", requests=32, kv_blocks=48, completed=sum(r[-1]["reason"] == "length" for r, _ in results),
           preemptions=int(preemptions), after=idle)
    assert preemptions > 0 and not any(idle.values())


def test_beyond_the_queue_limit_the_next_request_is_told_busy(tight_server):
    """32 slow requests (test hook: every step with one of them takes 0.1 s longer) stay in flight.

    All of them are slow, not just one: with 48 KV blocks, preemption can take any request out of the batch,
    and the batch must not then run fast enough for the others to finish before the test cancels them."""
    hold = dict(stream=True, max_tokens=150, ignore_eos=True)
    with ThreadPoolExecutor(32) as pool:
        held = [pool.submit(send_raw, tight_server.url, inputs_of(f"Question {i} " + fault_injection.SLOW_MARKER,
                                                                   **hold), cancel_after_s=10) for i in range(32)]
        wait_for(lambda: in_flight(tight_server) >= 32, 30, "32 requests not in flight", poll_s=0.02)
        t0 = time.monotonic()
        busy = send_raw(tight_server.url, inputs_of("One more?", max_tokens=4))
        refused_in = time.monotonic() - t0
        results = [f.result() for f in held]
    assert error_kind(busy[1]) == "busy" and "max_queued_requests" in str(busy[1]), busy
    assert all(error == "cancelled by the test" for _, error in results)   # none had finished: all were held
    idle = tight_server.wait_until_idle()
    record("queue limit", in_flight=32, refused_with="server busy", refused_in_s=round(refused_in, 3), after=idle)
    assert not any(idle.values())


@pytest.mark.parametrize("kw, needle", [
    (dict(text="hi", max_tokens=161), "max_output_tokens"),
    (dict(text="word " * 400, max_tokens=4), "max_prompt_tokens"),
    (dict(text="x" * 5000, max_tokens=4), "max_text_bytes"),
    (dict(text="hi", images=[b"\x89PNG" + bytes(300_000)], max_tokens=4), "max_image_bytes"),
])
def test_configured_limits_reach_the_client(tight_server, kw, needle):
    responses, error = send_raw(tight_server.url, inputs_of(**kw))
    assert responses == [] and needle in str(error), str(error)
