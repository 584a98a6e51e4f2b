"""Streaming many clients through the real tritonserver: coalesced responses (`stream_interval` 3 here, so responses
of several tokens occur for certain), hundreds of concurrent streams with cancellations and an overflow, and the
OpenAI SDK reading coalesced chunks. Outputs are compared with the same requests run alone in-process."""
from __future__ import annotations

import asyncio
import time

import fault_injection
import openai
import pytest

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.server.openai.errors import OpenAIError
from bunny_backend.server.openai.options import FrontOptions
from bunny_backend.server.openai.triton_client import TritonClient
from bunny_client.grpc_requests import BunnyStream, RequestOptions
from grpc_helpers import TEXTS, inputs_of, joined, send
from server_fixture import SERVER_PARAMS, start_server, stop_process

pytestmark = pytest.mark.server
INTERVAL = 3
CAPACITY = {"max_num_seqs": 16, "max_queued_requests": 240}   # 256 requests in flight at the most


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    params = {**SERVER_PARAMS, "stream_interval": str(INTERVAL), **{k: str(v) for k, v in CAPACITY.items()}}
    s = start_server(tiny_checkpoint, tmp_path_factory.mktemp("streaming") / "server.log", params, openai=True)
    yield s
    rc = stop_process(s.proc)
    assert rc == 0, f"bunny-serve exited with {rc} on SIGTERM:\n{s.log_text()[-3000:]}"


@pytest.fixture(scope="module")
def solo(tiny_checkpoint):
    """Each request run alone in an engine of the server's parameters: (text, ids)."""
    kw = {k: int(v) for k, v in SERVER_PARAMS.items() if k != "num_threads"}
    engine = LLMEngine(EngineConfig(model_path=str(tiny_checkpoint), device="cpu", dtype="float32", **kw))
    cache = {}

    def run(text, images=(), **params):
        key = (text, tuple(images), tuple(sorted(params.items())))
        if key not in cache:
            engine.add_request("solo", text, list(images), SamplingParams(**params))
            out_text, ids = "", []
            while engine.has_unfinished():
                for out in engine.step():
                    out_text, ids = out_text + out.delta_text, ids + out.delta_token_ids
            cache[key] = (out_text, ids)
        return cache[key]
    return run


@pytest.mark.parametrize("text,with_image", [(TEXTS[2], True), (TEXTS[4], False), (TEXTS[0], True)])
def test_coalesced_stream_equals_the_whole_answer(server, solo, test_images, text, with_image):
    images = [test_images[0]] if with_image else []
    kw = dict(max_tokens=40, ignore_eos=True)
    whole, err = send(server.url, inputs_of(text, images, **kw))
    assert err is None
    deltas, err = send(server.url, inputs_of(text, images, stream=True, **kw))
    assert err is None
    assert joined(deltas) == (whole[0]["text"], whole[0]["ids"]) == solo(text, images, **kw)
    sizes = [len(d["ids"]) for d in deltas]
    # the first token at once, then at least INTERVAL tokens a response; the last ones travel with the final flag
    assert sizes[0] >= 1 and all(n >= INTERVAL for n in sizes[1:-1]) and sizes[-1] >= 1 and max(sizes) > 1, sizes
    assert [d["final"] for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert all(d["reason"] == "" for d in deltas[:-1]) and deltas[-1]["reason"] == "length"
    assert deltas[-1]["completion"] == 40 and deltas[-1]["prompt"] == whole[0]["prompt"]


def test_logprobs_travel_with_their_tokens_through_coalesced_streams(server, solo, test_images):
    """logprobs 3 (with penalties and min_tokens on): every response's logprob records match its output_ids, the
    streamed ones (coalesced) concatenate to the whole answer's, the tokens are the in-process engine's; a request
    that did not ask gets none."""
    kw = dict(max_tokens=24, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=4)
    with BunnyStream(server.url) as conn:
        whole = list(conn.generate(RequestOptions(text=TEXTS[2], images=[test_images[0]], logprobs=3, **kw)))
        deltas = list(conn.generate(RequestOptions(text=TEXTS[2], images=[test_images[0]], logprobs=3, stream=True,
                                                   **kw)))
        plain = list(conn.generate(RequestOptions(text=TEXTS[2], images=[test_images[0]], stream=True, **kw)))
    assert len(whole) == 1 and max(len(d.ids) for d in deltas) > 1
    for d in whole + deltas:
        assert len(d.logprobs) == len(d.ids)
        for lp in d.logprobs:
            assert len(lp.top) == 3 and [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
            # every id of the demo vocabulary has bytes
            assert lp.logprob <= 0 and lp.bytes and all(t.bytes for t in lp.top)
            # a record belongs to its id: where the id is among the top, the logprobs agree
            assert all(t.logprob == lp.logprob for t in lp.top if t.id == lp.id)
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert [(lp.id, lp.bytes, [t.id for t in lp.top]) for lp in streamed] == \
        [(lp.id, lp.bytes, [t.id for t in lp.top]) for lp in whole[0].logprobs]
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in whole[0].logprobs], abs=1e-5)
    assert whole[0].ids == solo(TEXTS[2], [test_images[0]], **kw)[1]
    assert all(d.logprobs is None for d in plain) and sum((d.ids for d in plain), []) == whole[0].ids


def test_the_openai_sdk_reassembles_coalesced_chunks(server, solo):
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": TEXTS[5]}]
    text, ids, sizes = "", [], []
    for chunk in client.chat.completions.create(model="bunny", messages=messages, max_tokens=30, temperature=0,
                                                stream=True, extra_body={"return_token_ids": True,
                                                                         "ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        new = (chunk.choices[0].model_extra or {}).get("token_ids") if chunk.choices else None
        if new:
            ids += new
            sizes.append(len(new))
    assert (text, ids) == solo(TEXTS[5], max_tokens=30, ignore_eos=True)
    assert max(sizes) >= INTERVAL, sizes


async def _many_streams(url: str, jobs: list[dict]) -> list[dict]:
    """Each job one request on its own gRPC stream (8 channels); a job with `cancel_after` abandons its stream
    (a cancellation Triton passes on to the model) once that many tokens came."""
    clients = [TritonClient(FrontOptions(url)) for _ in range(8)]

    async def one(i: int, job: dict) -> dict:
        t0, ids, text = time.perf_counter(), [], ""
        responses = clients[i % len(clients)].generate(job["inputs"])
        try:
            async for r in responses:
                ids, text = ids + r.ids, text + r.text
                if job.get("cancel_after") and len(ids) >= job["cancel_after"]:
                    await responses.aclose()   # cancels the call: the request was not finished
                    return {"kind": "cancelled", "ids": ids}
                if r.final:
                    return {"kind": "done", "ids": ids, "text": text, "reason": r.finish_reason}
        except OpenAIError as e:
            return {"kind": "error", "status": e.status, "message": e.message, "after_s": time.perf_counter() - t0}
        return {"kind": "unfinished", "ids": ids}

    try:
        return await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    finally:
        for c in clients:
            await c.close()


def test_hundreds_of_streams_with_cancellations_and_an_overflow(server, solo):
    """More clients than max_num_seqs + max_queued_requests, a third of the accepted ones cancelled midway: the
    overflow is refused at once with "server busy", every cancelled request is taken down on the server (its count
    equals the client's, the KV blocks return to zero), and every other stream equals its run alone."""
    capacity = CAPACITY["max_num_seqs"] + CAPACITY["max_queued_requests"]
    n = capacity + 32
    plain = dict(max_tokens=24, ignore_eos=True)
    jobs = []
    for i in range(n):
        if i % 3 == 0:   # held in flight until cancelled; its steps are slowed, so no seat frees before the
            # overflow has arrived                                                    (tests/fault_injection.py)
            jobs.append({"inputs": inputs_of(f"{TEXTS[i % 8]} {fault_injection.SLOW_MARKER}", stream=True,
                                             max_tokens=1500, ignore_eos=True), "cancel_after": 2})
        else:
            jobs.append({"inputs": inputs_of(TEXTS[i % 8], stream=True, **plain), "text": TEXTS[i % 8]})
    cancelled_before = server.metric("bunny_requests_total", finish_reason="cancelled")
    results = asyncio.run(asyncio.wait_for(_many_streams(server.url, jobs), 240))

    kinds = [r["kind"] for r in results]
    assert "unfinished" not in kinds
    busy = [r for r in results if r["kind"] == "error"]
    assert busy and all(r["status"] == 503 and "server busy" in r["message"] for r in busy), busy[:3]
    assert len(busy) <= n - capacity + kinds.count("done")   # refusals only where the server was full
    assert max(r["after_s"] for r in busy) < 30   # refused at once, not after waiting for a place
    for job, r in zip(jobs, results):
        if r["kind"] == "done":
            assert "cancel_after" not in job
            assert (r["text"], r["ids"]) == solo(job["text"], **plain) and r["reason"] == "length"
    cancelled = kinds.count("cancelled")
    assert cancelled >= (capacity // 3) - len(busy)
    deadline = time.monotonic() + 60
    while server.metric("bunny_requests_total", finish_reason="cancelled") - cancelled_before < cancelled:
        assert time.monotonic() < deadline, "the server did not take every cancellation down"
        time.sleep(0.1)
    assert server.metric("bunny_requests_total", finish_reason="cancelled") - cancelled_before == cancelled
    gauges = server.wait_until_idle()
    assert not any(gauges.values()), gauges
