"""`bunny-openai` as its own process in front of a real tritonserver started by bunny-serve without --openai-port:
its answers equal the gRPC path's, it lists its served name, reports health, and keeps serving after a 404."""
from __future__ import annotations

import base64
import subprocess
import sys
import urllib.request

import openai
import pytest

from bunny_backend.server.launch import free_ports, stop_process
from grpc_helpers import TEXTS, inputs_of, send
from server_fixture import bunny_server, wait_for  # noqa: F401 - the session's server

pytestmark = pytest.mark.server
SERVED = "bunny-tiny"


@pytest.fixture(scope="module")
def front(bunny_server, tmp_path_factory):  # noqa: F811
    port, = free_ports(1)
    log = open(tmp_path_factory.mktemp("openai") / "bunny-openai.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "bunny_backend.server.openai.cli", "--triton-url",
                             bunny_server.url, "--port", str(port), "--served-model-name", SERVED],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, f"bunny-openai exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(healthy, 60, "bunny-openai did not answer /health with 200")
    yield base
    assert stop_process(proc, 20) == 0
    log.seek(0)
    assert "Traceback" not in log.read()


@pytest.fixture(scope="module")
def client(front):
    return openai.OpenAI(base_url=front + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_lists_its_served_name(client):
    assert [m.id for m in client.models.list().data] == [SERVED]


def test_greedy_chats_equal_the_grpc_path(bunny_server, client, test_images):  # noqa: F811
    image = test_images[3]
    url = f"data:image/jpeg;base64,{base64.b64encode(image).decode()}"
    cases = [([{"role": "user", "content": TEXTS[1]}], TEXTS[1], []),
             ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                            {"type": "text", "text": TEXTS[0]}]}], TEXTS[0], [image])]
    for messages, text, images in cases:
        out = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=12, temperature=0,
                                             extra_body={"return_token_ids": True})
        responses, err = send(bunny_server.url, inputs_of(text, images, max_tokens=12))
        assert err is None
        r = responses[0]
        choice = out.choices[0]
        assert (choice.message.content, choice.model_extra["token_ids"]) == (r["text"], r["ids"])
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (r["prompt"], r["completion"])
        assert choice.finish_reason == r["reason"] and out.model == SERVED


def test_keeps_serving_after_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="bunny-huge", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:   # the model's own refusal, shown without its code
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "look at <image>"}])
    assert e.value.body["message"].startswith("the prompt has 1 <image> placeholder(s) but 0 image(s)")
    out = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert out.usage.completion_tokens >= 1
