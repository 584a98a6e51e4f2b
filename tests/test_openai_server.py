"""System tests of the OpenAI-compatible API (bunny-serve --openai-port) with the official `openai` SDK, of
Triton's own HTTP generate endpoints, and of `bunny-client chat --interactive`, against the session's real
tritonserver that takes two images per request (openai_server_helpers.py); answers are compared with the gRPC
path's for the same conversation."""
from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from bunny_client.cli import main as client_main
from grpc_helpers import TEXTS, inputs_of, send
from model_helpers import stop_cases
from openai_server_helpers import GREEDY, answer, assert_idle, data_url, grpc_messages, post, user
from server_fixture import wait_for

pytestmark = pytest.mark.server


def test_models_and_health(openai_server, openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["bunny"]
    with urllib.request.urlopen(f"http://127.0.0.1:{openai_server.openai_port}/health", timeout=10) as r:
        assert r.status == 200


def test_text_chat_equals_the_grpc_path(openai_server, openai_client):
    out = openai_client.chat.completions.create(model="bunny", messages=[user(TEXTS[1])], max_tokens=16, **GREEDY)
    responses, err = send(openai_server.url, inputs_of(TEXTS[1], max_tokens=16))
    assert err is None
    r = responses[0]
    assert answer(out) == (r["text"], r["ids"]) and out.choices[0].finish_reason == r["reason"]
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])
    assert out.usage.total_tokens == r["prompt"] + r["completion"] and out.model == "bunny"


def test_image_chat_with_a_data_url_equals_the_grpc_path(openai_server, openai_client, test_images):
    out = openai_client.chat.completions.create(model="bunny", messages=[user(TEXTS[0], test_images[3])],
                                                max_completion_tokens=12, **GREEDY)
    responses, err = send(openai_server.url, inputs_of(TEXTS[0], [test_images[3]], max_tokens=12))
    assert err is None
    r = responses[0]
    assert answer(out) == (r["text"], r["ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])
    text_only = openai_client.chat.completions.create(model="bunny", messages=[user(TEXTS[0])], max_tokens=1)
    assert out.usage.prompt_tokens > text_only.usage.prompt_tokens + 16   # image features counted


def test_three_turn_conversation_with_two_images(openai_server, openai_client, test_images):
    a, b = test_images[0], test_images[2]
    sdk = [{"role": "system", "content": "You describe pictures."}, user("What is in the picture?", a),
           {"role": "assistant", "content": "A person in a suit."},
           {"role": "user", "content": [{"type": "text", "text": "And in this one?"},
                                        {"type": "image_url", "image_url": {"url": data_url(b)}}]},
           {"role": "assistant", "content": "A cat."}, user("Which is brighter?")]
    out = openai_client.chat.completions.create(model="bunny", messages=sdk, max_tokens=12, **GREEDY)
    plain = [{"role": "system", "content": "You describe pictures."},
             {"role": "user", "content": "<image>\nWhat is in the picture?"},
             {"role": "assistant", "content": "A person in a suit."},
             {"role": "user", "content": "And in this one?\n<image>"},
             {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Which is brighter?"}]
    text, ids, r = grpc_messages(openai_server.url, plain, [a, b], max_tokens=12)
    assert answer(out) == (text, ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])


def test_streamed_chat_equals_the_whole_answer(openai_server, openai_client, test_images):
    kw = dict(model="bunny", messages=[user(TEXTS[2], test_images[1])], max_tokens=20, seed=7, temperature=0.8,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    whole = openai_client.chat.completions.create(**kw)
    chunks = list(openai_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
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
def test_openai_stop_cuts_like_the_model(openai_server, openai_client, stream):
    """OpenAI `stop`: the cut the oracle in model_helpers.stop_cases derives from an unstopped answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(openai_server.model_path))
    kw = dict(model="bunny", messages=[user(TEXTS[3])], max_tokens=40, temperature=0,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    free = openai_client.chat.completions.create(**kw)
    assert free.choices[0].finish_reason == "length"
    for stop, want_text, want_ids, want_reason in stop_cases(tokenizer, *answer(free)):
        if stream:
            chunks = list(openai_client.chat.completions.create(stream=True, stop=[stop],
                                                                stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            out = openai_client.chat.completions.create(stop=stop, **kw)
            (text, ids), reason, usage = answer(out), [out.choices[0].finish_reason], out.usage
        assert (text, ids, reason) == (want_text, want_ids, [want_reason]), stop
        assert usage.completion_tokens == len(want_ids)


def test_sse_ends_with_done(openai_server):
    body = json.dumps({"model": "bunny", "messages": [user("hi")], "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(openai_server.openai_url + "/chat/completions", data=body,
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
def test_bad_requests_get_400_naming_the_problem(openai_server, openai_client, test_images, stream):
    three = user("compare", *test_images[:3])
    cases = BAD + [(dict(messages=[three]), "3 images given; this model takes at most 2")]
    for fields, needle in cases:
        if stream and "stream_options" in fields:
            continue
        body = {"model": "bunny", "messages": [user("hi")], "max_tokens": 4, "stream": stream, **fields}
        status, reply = post(openai_server, body)
        assert status == 400, (fields, reply)
        error = reply["error"]
        assert needle in error["message"] and error["type"] == "invalid_request_error", (fields, error)
    status, reply = post(openai_server, {"model": "gpt-4o", "messages": [user("hi")], "stream": stream})
    assert status == 404 and reply["error"]["code"] == "model_not_found", reply
    status, reply = post(openai_server, b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n must be in"):
        openai_client.chat.completions.create(model="bunny", messages=[user("hi")], n=129)
    assert_idle(openai_server)


def test_harmless_fields_are_ignored(openai_client):
    """The same answer with and without the fields that change nothing (user, metadata, n=1)."""
    kw = dict(model="bunny", messages=[user("hi")], max_tokens=6, temperature=0)
    out = openai_client.chat.completions.create(**kw, user="u1", metadata={"k": "v"}, n=1)
    plain = openai_client.chat.completions.create(**kw)
    assert len(out.choices) == 1 and out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.completion_tokens == plain.usage.completion_tokens >= 1
    assert out.choices[0].finish_reason == plain.choices[0].finish_reason


def test_32_concurrent_streams_equal_their_sequential_runs(openai_client, test_images):
    def run(i):
        images = [test_images[i % 4]] if i % 3 == 0 else []
        chunks = openai_client.chat.completions.create(
            model="bunny", messages=[user(TEXTS[i % len(TEXTS)], *images)], max_tokens=6 + i, stream=True,
            **GREEDY)
        ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
        return ids
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    alone = [run(i) for i in range(32)]
    assert together == alone and all(together)


def _open_stream(openai_server, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": "bunny", "messages": [user(TEXTS[3])], "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", openai_server.openai_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_that_drops_mid_stream_frees_its_kv_blocks(openai_server):
    before = openai_server.metric("bunny_requests_total", finish_reason="cancelled")
    sock = _open_stream(openai_server, 1900)
    seen = b""
    while seen.count(b"data: ") < 4:
        seen += sock.recv(65536)
    wait_for(lambda: openai_server.metric("bunny_kv_blocks_used") > 0, 20, "the stream's blocks never showed")
    sock.close()
    wait_for(lambda: openai_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1, 20,
             "the dropped stream was not cancelled")
    assert_idle(openai_server)


def test_a_client_that_drops_before_its_whole_answer_frees_its_kv_blocks(openai_server):
    before = openai_server.metric("bunny_requests_total", finish_reason="cancelled")
    body = json.dumps({"model": "bunny", "messages": [user(TEXTS[4])], "max_tokens": 1900,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", openai_server.openai_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: openai_server.metric("bunny_kv_blocks_used") > 0, 20, "the request did not start")
    sock.close()
    wait_for(lambda: openai_server.metric("bunny_requests_total", finish_reason="cancelled") == before + 1, 20,
             "the dropped request was not cancelled")
    assert_idle(openai_server)


def test_literal_image_tag_without_an_image_is_a_clear_grpc_error(openai_server):
    responses, err = send(openai_server.url, inputs_of("what is <image>?", max_tokens=4))
    assert responses == [] and "1 <image> placeholder(s) but 0 image(s)" in err and "internal" not in err


# ---- Triton's own HTTP generate endpoints (text requests) ------------------------------------------------------

def test_triton_http_generate_and_generate_stream(openai_server):
    base = f"http://127.0.0.1:{openai_server.http_port}/v2/models/bunny"
    body = {"text_input": TEXTS[6], "max_tokens": 10}
    req = urllib.request.Request(base + "/generate", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        whole = json.loads(r.read())
    responses, err = send(openai_server.url, inputs_of(TEXTS[6], max_tokens=10))
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

def test_interactive_chat_keeps_the_conversation_and_resets(openai_server, test_images, tmp_path, monkeypatch, capsys):
    files = []
    for i in (0, 1):
        files += ["--image", str(tmp_path / f"{i}.png")]
        (tmp_path / f"{i}.png").write_bytes(test_images[i])
    monkeypatch.setattr("sys.stdin", io.StringIO("What is shown?\nAnd then?\n/reset\nTell me more.\n"))
    rc = client_main(["chat", "--url", openai_server.url, "--interactive", *files, "--max-tokens", "6", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0 and err.count("completion 6 tokens") == 3 and "[conversation cleared]" in err
    kw = dict(max_tokens=6, ignore_eos=True)
    images = test_images[:2]
    a1, _, _ = grpc_messages(openai_server.url, [{"role": "user", "content": "What is shown?"}], images, **kw)
    a2, _, _ = grpc_messages(openai_server.url, [{"role": "user", "content": "What is shown?"},
                                                 {"role": "assistant", "content": a1},
                                                 {"role": "user", "content": "And then?"}], images, **kw)
    a3, _, _ = grpc_messages(openai_server.url, [{"role": "user", "content": "Tell me more."}], images, **kw)
    assert out == f"{a1}\n{a2}\n{a3}\n"
