"""System tests of the OpenAI-compatible API (bunny-serve --openai-port) with the official `openai` SDK, of
Triton's own HTTP generate endpoints, and of `bunny-client chat --interactive`, against one real tritonserver
that takes two images per request; answers are compared with the gRPC path's for the same conversation."""
from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch

from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from bunny_client.cli import main as client_main
from grpc_helpers import TEXTS, inputs_of, send
from model_helpers import prompt_ids, stop_cases
from server_fixture import SERVER_PARAMS, start_server, stop_process, wait_for

pytestmark = pytest.mark.server
GREEDY = dict(temperature=0, extra_body={"return_token_ids": True})


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    s = start_server(tiny_checkpoint, tmp_path_factory.mktemp("openai") / "server.log",
                     {**SERVER_PARAMS, "max_images_per_request": "2"}, openai=True)
    yield s
    rc = stop_process(s.proc)
    assert rc == 0, f"bunny-serve exited with {rc} on SIGTERM:\n{s.log_text()[-3000:]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def data_url(image: bytes) -> str:
    kind = "jpeg" if image[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def user(text: str, *images: bytes) -> dict:
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def grpc_messages(url, messages, images=(), **scalars):
    """The same conversation through the model's `messages` input: (text, ids, last response)."""
    inputs = inputs_of(None, images, **scalars)
    inputs["messages"] = np.array([json.dumps(messages).encode()], dtype=object)
    responses, err = send(url, inputs)
    assert err is None, err
    return responses[0]["text"], responses[0]["ids"], responses[0]


def answer(completion) -> tuple[str, list[int]]:
    choice = completion.choices[0]
    return choice.message.content, choice.model_extra["token_ids"]


def post(server, body: dict | bytes, path="/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.openai_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_idle(server):
    gauges = server.wait_until_idle()
    assert not any(gauges.values()), gauges


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["bunny"]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.openai_port}/health", timeout=10) as r:
        assert r.status == 200


def test_text_chat_equals_the_grpc_path(server, client):
    out = client.chat.completions.create(model="bunny", messages=[user(TEXTS[1])], max_tokens=16, **GREEDY)
    responses, err = send(server.url, inputs_of(TEXTS[1], max_tokens=16))
    assert err is None
    r = responses[0]
    assert answer(out) == (r["text"], r["ids"]) and out.choices[0].finish_reason == r["reason"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])
    assert out.usage.total_tokens == r["prompt"] + r["completion"] and out.model == "bunny"


def test_image_chat_with_a_data_url_equals_the_grpc_path(server, client, test_images):
    out = client.chat.completions.create(model="bunny", messages=[user(TEXTS[0], test_images[3])],
                                         max_completion_tokens=12, **GREEDY)
    responses, err = send(server.url, inputs_of(TEXTS[0], [test_images[3]], max_tokens=12))
    assert err is None
    r = responses[0]
    assert answer(out) == (r["text"], r["ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])
    text_only = client.chat.completions.create(model="bunny", messages=[user(TEXTS[0])], max_tokens=1)
    assert out.usage.prompt_tokens > text_only.usage.prompt_tokens + 16   # image features counted


def test_three_turn_conversation_with_two_images(server, client, test_images):
    a, b = test_images[0], test_images[2]
    sdk = [{"role": "system", "content": "You describe pictures."}, user("What is in the picture?", a),
           {"role": "assistant", "content": "A person in a suit."},
           {"role": "user", "content": [{"type": "text", "text": "And in this one?"},
                                        {"type": "image_url", "image_url": {"url": data_url(b)}}]},
           {"role": "assistant", "content": "A cat."}, user("Which is brighter?")]
    out = client.chat.completions.create(model="bunny", messages=sdk, max_tokens=12, **GREEDY)
    plain = [{"role": "system", "content": "You describe pictures."},
             {"role": "user", "content": "<image>\nWhat is in the picture?"},
             {"role": "assistant", "content": "A person in a suit."},
             {"role": "user", "content": "And in this one?\n<image>"},
             {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Which is brighter?"}]
    text, ids, r = grpc_messages(server.url, plain, [a, b], max_tokens=12)
    assert answer(out) == (text, ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])


def test_streamed_chat_equals_the_whole_answer(server, client, test_images):
    kw = dict(model="bunny", messages=[user(TEXTS[2], test_images[1])], max_tokens=20, seed=7, temperature=0.8,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1
    text = "".join(c.choices[0].delta.content for c in content)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    assert (text, ids) == answer(whole)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_stop_cuts_like_the_model(server, client, stream):
    """OpenAI `stop`: the cut the oracle in model_helpers.stop_cases derives from an unstopped answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server.model_path))
    kw = dict(model="bunny", messages=[user(TEXTS[3])], max_tokens=40, temperature=0,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    free = client.chat.completions.create(**kw)
    assert free.choices[0].finish_reason == "length"
    for stop, want_text, want_ids, want_reason in stop_cases(tokenizer, *answer(free)):
        if stream:
            chunks = list(client.chat.completions.create(stream=True, stop=[stop], stream_options={"include_usage": True},
                                                         **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            out = client.chat.completions.create(stop=stop, **kw)
            (text, ids), reason, usage = answer(out), [out.choices[0].finish_reason], out.usage
        assert (text, ids, reason) == (want_text, want_ids, [want_reason]), stop
        assert usage.completion_tokens == len(want_ids)


def test_sse_ends_with_done(server):
    body = json.dumps({"model": "bunny", "messages": [user("hi")], "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(server.openai_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


BAD = [
    (dict(n=0), "n must be in [1, 128], got 0"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "unsupported field(s) ['tools']"),
    (dict(top_logprobs=2), "top_logprobs needs logprobs set to true"),
    (dict(response_format={"type": "xml"}), 'response_format.type must be one of text, json_object, json_schema'),
    (dict(frobnicate=1), "unknown field(s) ['frobnicate']"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]),
     "this server does not fetch images from 'example.com' (it allows none"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), "base64 data is invalid"),
    (dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]), "not a readable image"),
    (dict(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "content part type 'input_audio' is not supported"),
    (dict(messages=[{"role": "user", "content": "look at <image>"}]), "1 <image> placeholder(s) but 0 image(s)"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "role 'tool' is not supported"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), "where the user's should be"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"),
    (dict(seed=-1), "seed must be in [0, 2^64)"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stream_options={"include_usage": True}), "stream_options is only allowed when stream is true"),
    (dict(max_tokens=100000), "context"),
    (dict(messages="hello"), "messages: Input should be a valid array"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_400_naming_the_problem(server, client, test_images, stream):
    three = user("compare", *test_images[:3])
    cases = BAD + [(dict(messages=[three]), "3 images given; this model takes at most 2")]
    for fields, needle in cases:
        if stream and "stream_options" in fields:
            continue
        body = {"model": "bunny", "messages": [user("hi")], "max_tokens": 4, "stream": stream, **fields}
        status, reply = post(server, body)
        assert status == 400, (fields, reply)
        error = reply["error"]
        assert needle in error["message"] and error["type"] == "invalid_request_error", (fields, error)
    status, reply = post(server, {"model": "gpt-4o", "messages": [user("hi")], "stream": stream})
    assert status == 404 and reply["error"]["code"] == "model_not_found", reply
    status, reply = post(server, b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        client.chat.completions.create(model="bunny", messages=[user("hi")], n=129)
    assert_idle(server)


PET = {"type": "object", "additionalProperties": False, "required": ["name", "legs", "kind"],
       "properties": {"name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["cat", "dog"]},
                      "legs": {"type": "array", "maxItems": 4, "items": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}}}}


def test_structured_output_parses_and_a_bad_schema_is_a_400(server, client):
    import jsonschema
    pet = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    kw = dict(model="bunny", messages=[user("Describe a pet as JSON.")], max_tokens=100, temperature=1)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda seed: client.chat.completions.create(seed=seed, response_format=pet, **kw),
                             range(4)))
    for out in outs:
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), PET)
    choice = client.chat.completions.create(extra_body={"guided_choice": ["yes", "no"]}, **kw)
    assert choice.choices[0].message.content in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError, match='JSON schema cannot be compiled: Unsupported type "frobnicate"'):
        client.chat.completions.create(response_format=bad, **kw)
    again = client.chat.completions.create(seed=7, response_format=pet, **kw)
    jsonschema.validate(json.loads(again.choices[0].message.content), PET)
    assert_idle(server)


def test_sdk_parse_with_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        kind: Literal["cat", "dog"]
        legs: list[int] = Field(max_length=4)

    out = client.chat.completions.parse(model="bunny", messages=[user("Describe a pet as JSON.")], max_tokens=100,
                                        temperature=1, seed=3, response_format=Pet)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and out.choices[0].finish_reason == "stop"
    assert pet == Pet.model_validate_json(out.choices[0].message.content)


def test_harmless_fields_are_ignored(client):
    """The same answer with and without the fields that change nothing (user, metadata, n=1)."""
    kw = dict(model="bunny", messages=[user("hi")], max_tokens=6, temperature=0)
    out = client.chat.completions.create(**kw, user="u1", metadata={"k": "v"}, n=1)
    plain = client.chat.completions.create(**kw)
    assert len(out.choices) == 1 and out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.completion_tokens == plain.usage.completion_tokens >= 1
    assert out.choices[0].finish_reason == plain.choices[0].finish_reason


def test_32_concurrent_streams_equal_their_sequential_runs(client, test_images):
    def run(i):
        images = [test_images[i % 4]] if i % 3 == 0 else []
        chunks = client.chat.completions.create(
            model="bunny", messages=[user(TEXTS[i % len(TEXTS)], *images)], max_tokens=6 + i, stream=True,
            **GREEDY)
        ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
        return ids
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    alone = [run(i) for i in range(32)]
    assert together == alone and all(together)


def _open_stream(server, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": "bunny", "messages": [user(TEXTS[3])], "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.openai_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_that_drops_mid_stream_frees_its_kv_blocks(server):
    before = server.metric("bunny_requests_total", finish_reason="cancelled")
    sock = _open_stream(server, 1900)
    seen = b""
    while seen.count(b"data: ") < 4:
        seen += sock.recv(65536)
    wait_for(lambda: server.metric("bunny_kv_blocks_used") > 0, 20, "the stream's blocks never showed")
    sock.close()
    wait_for(lambda: server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1, 20,
             "the dropped stream was not cancelled")
    assert_idle(server)


def test_a_client_that_drops_before_its_whole_answer_frees_its_kv_blocks(server):
    before = server.metric("bunny_requests_total", finish_reason="cancelled")
    body = json.dumps({"model": "bunny", "messages": [user(TEXTS[4])], "max_tokens": 1900,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.openai_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: server.metric("bunny_kv_blocks_used") > 0, 20, "the request did not start")
    sock.close()
    wait_for(lambda: server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1, 20,
             "the dropped request was not cancelled")
    assert_idle(server)


def test_literal_image_tag_without_an_image_is_a_clear_grpc_error(server):
    responses, err = send(server.url, inputs_of("what is <image>?", max_tokens=4))
    assert responses == [] and "1 <image> placeholder(s) but 0 image(s)" in err and "internal" not in err


# ---- /v1/completions, n choices, logprobs ---------------------------------------------------------------------

def test_completions_equal_the_grpc_path_without_the_template(server, client):
    prompts = [TEXTS[1], TEXTS[4]]
    kw = dict(model="bunny", prompt=prompts, max_tokens=12, **GREEDY)
    out = client.completions.create(**kw)
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1]
    want = []
    for text in prompts:
        responses, err = send(server.url, inputs_of(text, max_tokens=12, apply_chat_template=False))
        assert err is None, err
        want.append(responses[0])
    assert [(c.text, c.model_extra["token_ids"], c.finish_reason) for c in out.choices] == \
        [(r["text"], r["ids"], r["reason"]) for r in want]
    assert out.usage.prompt_tokens == sum(r["prompt"] for r in want)
    assert out.usage.completion_tokens == sum(r["completion"] for r in want)
    chunks = list(client.completions.create(stream=True, **kw))
    for i, c in enumerate(out.choices):
        assert "".join(k.choices[0].text for k in chunks if k.choices and k.choices[0].index == i) == c.text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_n_seeded_choices_are_each_the_request_with_seed_s_plus_i(server, client, stream):
    kw = dict(model="bunny", messages=[user(TEXTS[3])], n=4, seed=11, temperature=0.9, max_tokens=10,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        got = [[t for c in chunks if c.choices and c.choices[0].index == i
                for t in c.choices[0].model_extra.get("token_ids") or []] for i in range(4)]
    else:
        got = [c.model_extra["token_ids"] for c in client.chat.completions.create(**kw).choices]
    want = [grpc_messages(server.url, [{"role": "user", "content": TEXTS[3]}], seed=11 + i, temperature=0.9,
                          max_tokens=10, ignore_eos=True)[1] for i in range(4)]
    assert got == want and len({tuple(ids) for ids in got}) > 1
    assert_idle(server)


def test_n_greedy_choices_are_equal_and_share_the_prompt_s_kv(server, client):
    """n=4 greedy: four equal answers; the prompt is computed once, the three others take it from the prefix cache
    (a prompt no earlier test sent; 16-token blocks on the CPU)."""
    text = "Count the rabbits in this long and unusual meadow of clover, " * 8
    hits = server.metric("bunny_prefix_cache_hit_tokens_total")
    out = client.chat.completions.create(model="bunny", messages=[user(text)], n=4, max_tokens=4, **GREEDY)
    answers = [c.model_extra["token_ids"] for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and all(a == answers[0] for a in answers)
    assert_idle(server)
    prompt = out.usage.prompt_tokens
    # the first choice may also hit the system prompt's blocks, cached by earlier requests
    assert prompt > 64 and server.metric("bunny_prefix_cache_hit_tokens_total") - hits >= 3 * ((prompt - 1) // 16 * 16)


def test_chat_logprobs_are_consistent_with_the_answer(client):
    """Greedy: each token is its position's most likely one, its bytes join to the text, logprobs are <= 0."""
    out = client.chat.completions.create(model="bunny", messages=[user(TEXTS[1])], max_tokens=12, logprobs=True,
                                         top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == len(out.choices[0].model_extra["token_ids"]) == out.usage.completion_tokens
    # random weights may emit bytes that are not UTF-8 (the text then holds U+FFFD where they stand)
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].bytes == t.bytes and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=5, presence_penalty=1.5,
                                                                frequency_penalty=0.5)], ids=["greedy", "sampled"])
def test_chat_logprobs_are_the_reference_log_softmax(client, tiny_checkpoint, sampling):
    """float32 server: each token's logprob is the transformers reference's raw log-softmax at its position within
    1e-4, whatever chose the token; the alternatives are the reference's best, sorted."""
    out = client.chat.completions.create(model="bunny", messages=[user(TEXTS[2])], max_tokens=8, logprobs=True,
                                         top_logprobs=4, extra_body={"return_token_ids": True, "ignore_eos": True},
                                         **sampling)
    ids, content = out.choices[0].model_extra["token_ids"], out.choices[0].logprobs.content
    ref, tok = ReferenceBunny.from_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    prompt = prompt_ids(tok, TEXTS[2], False)
    want = torch.log_softmax(ref.logits(prompt + ids[:-1], None).double(), dim=-1)[len(prompt) - 1:]
    assert len(content) == len(ids) == want.shape[0] == 8
    for row, token, got in zip(want, ids, content):
        assert got.logprob == pytest.approx(row[token].item(), abs=1e-4)
        best = row.topk(4)
        assert [a.logprob for a in got.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)


# ---- Triton's own HTTP generate endpoints (text requests) ------------------------------------------------------

def test_triton_http_generate_and_generate_stream(server):
    base = f"http://127.0.0.1:{server.http_port}/v2/models/bunny"
    body = {"text_input": TEXTS[6], "max_tokens": 10}
    req = urllib.request.Request(base + "/generate", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        whole = json.loads(r.read())
    responses, err = send(server.url, inputs_of(TEXTS[6], max_tokens=10))
    assert err is None
    assert (whole["text_output"], whole["output_ids"], whole["finish_reason"]) == \
        (responses[0]["text"], responses[0]["ids"], responses[0]["reason"])
    req = urllib.request.Request(base + "/generate_stream", data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(e[len("data: "):]) for e in r.read().decode().split("\n\n") if e.startswith("data: ")]
    ids = [i for e in events for i in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
    assert "".join(e["text_output"] for e in events) == whole["text_output"] and ids == whole["output_ids"]
    assert events[-1]["finish_reason"] == whole["finish_reason"] and events[-1]["completion_tokens"] == 10
    req = urllib.request.Request(base + "/generate", data=json.dumps({"text_input": "", "max_tokens": 3}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "text_input is empty" in e.value.read().decode()


# ---- bunny-client chat --interactive ----------------------------------------------------------------------------

def test_interactive_chat_keeps_the_conversation_and_resets(server, test_images, tmp_path, monkeypatch, capsys):
    files = []
    for i in (0, 1):
        files += ["--image", str(tmp_path / f"{i}.png")]
        (tmp_path / f"{i}.png").write_bytes(test_images[i])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is shown?\nAnd then?\n/reset\nTell me more.\n"))
    rc = client_main(["chat", "--url", server.url, "--interactive", *files, "--max-tokens", "6", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0 and err.count("completion 6 tokens") == 3 and "[conversation cleared]" in err
    kw = dict(max_tokens=6, ignore_eos=True)
    images = test_images[:2]
    a1, _, _ = grpc_messages(server.url, [{"role": "user", "content": "What is shown?"}], images, **kw)
    a2, _, _ = grpc_messages(server.url, [{"role": "user", "content": "What is shown?"},
                                          {"role": "assistant", "content": a1},
                                          {"role": "user", "content": "And then?"}], images, **kw)
    a3, _, _ = grpc_messages(server.url, [{"role": "user", "content": "Tell me more."}], images, **kw)
    assert out == f"{a1}\n{a2}\n{a3}\n"
