"""What the OpenAI system tests share: one real server with the OpenAI front for the session (registered in
conftest.py), its SDK client, and helpers that build messages and compare with the gRPC path."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from grpc_helpers import inputs_of, send
from server_fixture import SERVER_PARAMS, start_server, stop_process

GREEDY = dict(temperature=0, extra_body={"return_token_ids": True})


@pytest.fixture(scope="session")
def openai_server(tiny_checkpoint, tmp_path_factory):
    """One bunny-serve with the OpenAI front, taking two images per request, for the OpenAI test modules."""
    s = start_server(tiny_checkpoint, tmp_path_factory.mktemp("openai") / "server.log",
                     {**SERVER_PARAMS, "max_images_per_request": "2"}, openai=True)
    yield s
    rc = stop_process(s.proc)
    assert rc == 0, f"bunny-serve exited with {rc} on SIGTERM:\n{s.log_text()[-3000:]}"


@pytest.fixture(scope="session")
def openai_client(openai_server):
    return openai.OpenAI(base_url=openai_server.openai_url, api_key="unused", max_retries=0, timeout=120)


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
