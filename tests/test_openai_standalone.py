"""The OpenAI front on its own (bunny-openai's options), in-process against the fake Triton: served model names and
404 for another, a Triton that comes up after the front, TLS and headers to Triton, errors mapped by the code the
model tags them with, and the command line's refusals."""
from __future__ import annotations

import signal
import subprocess
import sys

import openai
import pytest

from bunny_backend.server.launch import free_ports
from bunny_backend.server.openai import cli
from fake_triton_server import FakeServer
from openai_front_helpers import chat, fake_and_front, request, running_front
from server_fixture import wait_for


def test_served_model_names_are_listed_answered_and_anything_else_is_404():
    with fake_and_front(served_model_names=("bunny-v1", "bunny")) as (fake, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["bunny-v1", "bunny"]
        for name in ("bunny", "bunny-v1"):
            out = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
            assert out.model == name and out.choices[0].message.content == "answer hi"
        status, reply = request(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and reply["model"] == "bunny-v1"   # no model: the first name
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"
        assert e.value.body["message"].startswith("The model `gpt-4o` does not exist.")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert fake.servicer.requests == 3   # the 404s never reached Triton
        out = client.chat.completions.create(model="bunny", messages=[{"role": "user", "content": "still here"}])
        assert out.choices[0].message.content == "answer still here"


def test_a_triton_that_comes_up_later_is_503_until_then():
    triton_port, = free_ports(1)
    with running_front(f"127.0.0.1:{triton_port}") as url:
        status, reply = request(url + "/health")
        assert status == 503 and f"127.0.0.1:{triton_port}" in reply["error"]["message"]
        status, reply = request(url + "/v1/chat/completions", chat("hi"))
        assert status == 503 and reply["error"]["type"] == "service_unavailable"
        fake = FakeServer(port=triton_port)
        try:
            wait_for(lambda: request(url + "/health")[0] == 200, 60, "/health did not turn 200 once Triton was up",
                     poll_s=0.5)
            status, reply = request(url + "/v1/chat/completions", chat("hi"))
            assert status == 200 and reply["choices"][0]["message"]["content"] == "answer hi"
        finally:
            fake.stop()


def _certificate(tmp_path) -> tuple[str, str]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(key), str(cert)


def test_tls_and_headers_reach_triton(tmp_path):
    grpc = pytest.importorskip("grpc")
    key, cert = _certificate(tmp_path)
    with open(key, "rb") as k, open(cert, "rb") as c:
        credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
    fake = FakeServer(credentials=credentials, parameters={"max_images_per_request": "1", "max_image_bytes": "99"})
    try:
        with running_front(fake.url, ssl=True, root_certificates=cert,
                           headers={"authorization": "Bearer t0k", "x-tenant": "a"}) as url:
            assert request(url + "/health")[0] == 200
            status, reply = request(url + "/v1/chat/completions", chat("hi"))
            assert status == 200 and reply["choices"][0]["message"]["content"] == "answer hi"
            calls = fake.servicer.metadata
            assert len(calls) == 3   # ModelReady, ModelConfig, ModelStreamInfer
            assert all(m.get("authorization") == "Bearer t0k" and m.get("x-tenant") == "a" for m in calls)
        with running_front(fake.url) as url:   # plain text to a TLS endpoint: unreachable
            assert request(url + "/health")[0] == 503
    finally:
        fake.stop()


@pytest.mark.parametrize("message, status, shown", [
    ("[invalid_argument] max_tokens must be >= 1, got 0", 400, "max_tokens must be >= 1, got 0"),
    ("[unavailable] server busy: 3 requests in flight, the limit is 3", 503,
     "server busy: 3 requests in flight, the limit is 3"),
    ("[internal] engine error: RuntimeError: boom", 500, "engine error: RuntimeError: boom"),
    ("Request for unknown model: 'bunny' has no available versions", 503,
     "Request for unknown model: 'bunny' has no available versions"),
    ("inference request for unknown input 'frob'", 400, "inference request for unknown input 'frob'"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_model_errors_become_statuses_by_their_code(message, status, shown, stream):
    with fake_and_front() as (fake, url):
        got, reply = request(url + "/v1/chat/completions", chat("FAIL:" + message, stream=stream))
    assert (got, reply["error"]["message"]) == (status, shown)


@pytest.mark.parametrize("argv, needle", [
    (["--header", "novalue"], "--header takes KEY=VALUE"),
    (["--root-certificates", "/etc/hostname"], "need --ssl"),
    (["--ssl", "--root-certificates", "/nonexistent.pem"], "--root-certificates /nonexistent.pem"),
    (["--allowed-media-domains", "http://example.com/"], "takes host names"),
])
def test_bunny_openai_refuses_bad_flags(argv, needle, capsys):
    assert cli.main(["--triton-url", "127.0.0.1:1", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_bunny_openai_runs_without_triton_and_stops_cleanly():
    port, triton_port = free_ports(2)
    proc = subprocess.Popen([sys.executable, "-m", "bunny_backend.server.openai.cli", "--triton-url",
                             f"127.0.0.1:{triton_port}", "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        status, reply = request(f"http://127.0.0.1:{port}/health")
        assert status == 503 and "cannot be reached" in reply["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    err = proc.stderr.read()
    assert rc == 0 and f"serving bunny on http://127.0.0.1:{port}/v1" in err and "Traceback" not in err
