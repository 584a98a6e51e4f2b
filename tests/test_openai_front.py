"""The OpenAI front without a model: request translation, error mapping, and the app in-process against a Triton
address where nothing listens (503s) — no tritonserver needed."""
from __future__ import annotations

import base64
import json
import socket
import threading

import numpy as np
import pytest

from bunny_backend.server.launch import free_ports
from bunny_backend.server.openai import media, translate
from bunny_backend.server.openai.errors import OpenAIError, from_triton
from bunny_backend.server.openai.served_models import ServedModels
from openai_front_helpers import request, running_front

PNG = b"\x89PNG\r\n\x1a\nfake"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
BUNNY = ServedModels(("bunny",))


def body(**fields) -> bytes:
    return json.dumps({"model": "bunny", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_parts_become_placeholders_where_they_stand():
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                {"role": "user", "content": [{"type": "text", "text": "And"},
                                             {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                                             {"type": "text", "text": "this?"}]}]
    req = translate.prepare(json.dumps({"model": "bunny", "messages": messages, "max_completion_tokens": 5,
                                        "stop": "END", "seed": 3, "stream": True,
                                        "stream_options": {"include_usage": True}}).encode(), BUNNY)
    req.attach_images()
    assert json.loads(req.inputs["messages"][0]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And\n<image>\nthis?"}]
    assert req.inputs["image"].tolist() == [PNG, PNG]
    assert req.inputs["max_tokens"].dtype == np.int32 and req.inputs["max_tokens"].tolist() == [5]
    assert req.inputs["seed"].dtype == np.uint64 and req.inputs["stop"].tolist() == [b"END"]
    assert req.stream and req.include_usage and not req.return_token_ids
    assert "temperature" not in req.inputs   # the model's default (greedy) applies


@pytest.mark.parametrize("fields, needle", [
    (dict(max_tokens=3, max_completion_tokens=4), "max_tokens and max_completion_tokens disagree"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]),
     "must be a data URL"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": "data:text/plain;base64,aGk="}}]}]),
     "of type image/"),
    (dict(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}]},
                    {"role": "user", "content": "hi"}]), "images are accepted in user messages only"),
    (dict(messages=[{"role": "user", "content": None}]), "has no content"),
    (dict(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]), "['tool_calls']"),
    (dict(messages=[]), "messages must not be empty"),
    (dict(top_logprobs=2), "top_logprobs needs logprobs set to true"),
    (dict(presence_penalty=3), "presence_penalty must be in [-2, 2], got 3"),
    (dict(logit_bias={"1": 1}), "unsupported field(s) ['logit_bias']"),
])
def test_translation_refuses_what_it_cannot_honour(fields, needle):
    with pytest.raises(OpenAIError) as err:
        translate.prepare(body(**fields), BUNNY)
    assert err.value.status == 400 and needle in err.value.message


@pytest.mark.parametrize("message, status, shown", [
    ("[unavailable] server busy: 272 requests in flight, the limit is 272", 503, None),
    ("[internal] internal error: KeyError: 'x'", 500, None),
    ("[internal] engine error: RuntimeError: boom", 500, None),
    ("[invalid_argument] image: the data is not a readable image", 400, None),
    ("in stream: [invalid_argument] max_tokens must be >= 1,\n got 0", 400, "max_tokens must be >= 1, got 0"),
    ("[unavailable] model unavailable: rank 1 died", 503, None),
    # untagged: Triton's own words
    ("Stub process 'bunny_0_0' is not healthy.", 503, "Stub process 'bunny_0_0' is not healthy."),
    ("Request for unknown model: 'bunny' has no available versions", 503, None),
    ("failed to connect to all addresses", 503, None),
    ("unexpected shape for input 'max_tokens' for model 'bunny'", 400, None),
    # the model's words without a tag are no longer read for keywords
    ("[bogus] server busy", 400, "[bogus] server busy"),
])
def test_triton_errors_map_to_http_statuses_by_their_code(message, status, shown):
    error = from_triton(message)
    if shown is None:
        shown = message.partition("] ")[2] if message.startswith("[") else message
    assert error.status == status and error.body()["error"]["message"] == shown


@pytest.fixture
def front_without_triton():
    dead, = free_ports(1)
    with running_front(f"127.0.0.1:{dead}") as url:
        yield url


def test_without_triton_health_and_chat_answer_503(front_without_triton):
    status, reply = request(front_without_triton + "/health")
    assert status == 503 and "not ready" in reply["error"]["message"]
    for stream in (False, True):
        status, reply = request(front_without_triton + "/v1/chat/completions", body(stream=stream))
        assert status == 503 and reply["error"]["type"] == "service_unavailable", reply
    status, reply = request(front_without_triton + "/v1/nothing")
    assert status == 404 and "error" in reply


def test_image_work_stays_off_the_event_loop(front_without_triton, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = media.decode_base64

    def held_decode(payload, where):   # a huge image's base64, held until the test has had its answer
        entered.set()
        release.wait(30)
        return real(payload, where)

    monkeypatch.setattr(media, "decode_base64", held_decode)
    data = json.dumps({"model": "bunny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}).encode()
    slow = threading.Thread(target=request, args=(front_without_triton + "/v1/chat/completions", data))
    slow.start()
    try:
        assert entered.wait(10)
        status, reply = request(front_without_triton + "/v1/models", timeout=5)   # a blocked loop times out
        assert status == 200 and reply["data"][0]["id"] == "bunny"
    finally:
        release.set()
        slow.join()


def test_bunny_serve_refuses_a_taken_openai_port_before_starting_triton(tiny_checkpoint, capsys):
    from bunny_backend.server import cli
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc = cli.main(["--model-path", str(tiny_checkpoint), "--openai-port", str(taken.getsockname()[1])])
    assert rc == 2 and "cannot serve the OpenAI API on 127.0.0.1:" in capsys.readouterr().err
