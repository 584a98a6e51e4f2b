"""The front's limits, in-process against the fake Triton: 413 for a body over the limit (by Content-Length and
while a chunked body arrives), the limit sized from the model config's image limits, and the image count and sizes
checked against that config before any base64 is decoded."""
from __future__ import annotations

import base64
import json
import socket

import pytest

from bunny_backend.server.openai import media
from openai_front_helpers import chat, data_url, fake_and_front, request

LIMITS = {"max_images_per_request": "2", "max_image_bytes": "3000"}


def raw_post(url: str, head: dict[str, str], body_pieces=()) -> tuple[int, dict]:
    """POST /v1/chat/completions by hand: the headers, then whatever pieces of body (not necessarily all of it),
    then the answer read from the socket."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        lines = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in head.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for piece in body_pieces:
            sock.sendall(piece)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2])


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def padded(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (JSON allows trailing spaces)."""
    body = json.dumps(chat("hi", max_tokens=2)).encode()
    return body + b" " * (size - len(body))


def test_content_length_over_the_set_limit_is_413_before_the_body_is_read():
    with fake_and_front(LIMITS, max_request_bytes=5000) as (fake, url):
        status, reply = raw_post(url, {"Content-Length": "5001"})   # no body sent at all
        assert status == 413 and "5000 bytes" in reply["error"]["message"]
        assert "--max-request-bytes" in reply["error"]["message"]
        status, reply = request(url + "/v1/chat/completions", padded(5000))
        assert status == 200 and reply["choices"][0]["message"]["content"] == "answer hi"


def test_a_chunked_body_is_cut_at_the_limit_while_it_arrives():
    with fake_and_front(LIMITS, max_request_bytes=5000) as (fake, url):
        piece = b"x" * 1000
        chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 6   # 6000 bytes, and never the last chunk
        status, reply = raw_post(url, {"Transfer-Encoding": "chunked"}, chunks)
        assert status == 413 and "5000 bytes" in reply["error"]["message"]
        body = padded(5000)
        whole = [f"{len(body):x}\r\n".encode() + body + b"\r\n", b"0\r\n\r\n"]
        status, reply = raw_post(url, {"Transfer-Encoding": "chunked"}, whole)
        assert status == 200, reply
        assert fake.servicer.requests == 1   # the 413 never reached the model


def test_the_default_limit_is_room_for_the_configs_images_in_base64_plus_a_mib():
    limit = 2 * (3000 * 4 // 3) + (1 << 20)   # 2 images of 3000 bytes as base64, and 1 MiB of text
    with fake_and_front(LIMITS) as (fake, url):
        status, reply = raw_post(url, {"Content-Length": str(limit + 1)})
        assert status == 413 and f"{limit} bytes" in reply["error"]["message"]
        status, reply = request(url + "/v1/chat/completions", padded(limit))
        assert status == 200, reply


def test_without_image_limits_in_the_config_the_limit_is_32_mib():
    with fake_and_front() as (fake, url):
        status, reply = raw_post(url, {"Content-Length": str((32 << 20) + 1)})
        assert status == 413 and f"{32 << 20} bytes" in reply["error"]["message"]
        status, reply = raw_post(url, {"Content-Length": str(32 << 20)}, [padded(32 << 20)])
        assert status == 200, reply


@pytest.mark.parametrize("size", range(0, 13))
def test_the_decoded_size_of_base64_is_exact(size):
    payload = base64.b64encode(bytes(range(size))).decode()
    assert media.base64_size(payload) == len(base64.b64decode(payload)) == size


def test_image_count_and_sizes_are_checked_from_the_config_before_decoding(monkeypatch):
    decoded = []
    real = media.decode_base64
    monkeypatch.setattr(media, "decode_base64", lambda payload, where: decoded.append(where) or real(payload, where))
    at_limit, over = bytes(3000), bytes(2999) + b"\x01\x02"
    with fake_and_front(LIMITS) as (fake, url):
        status, reply = request(url + "/v1/chat/completions", chat("three", *[data_url(at_limit)] * 3))
        assert status == 400 and reply["error"]["message"] == \
            "3 images given; this model takes at most 2 (max_images_per_request)"
        status, reply = request(url + "/v1/chat/completions", chat("big", data_url(at_limit), data_url(over)))
        assert status == 400
        assert reply["error"]["message"] == ("messages[0].content[1]: image: 3001 bytes, more than the 3000 allowed "
                                             "(max_image_bytes)")
        assert reply["error"]["param"] == "messages[0].content[1]"
        assert decoded == [] and fake.servicer.requests == 0   # refused before any decoding, never sent
        status, reply = request(url + "/v1/chat/completions", chat("fits", data_url(at_limit), data_url(at_limit)))
        assert fake.servicer.images == [[at_limit, at_limit]]   # the model got them (and calls them unreadable)
        assert status == 400 and "not a readable image" in reply["error"]["message"]
        assert fake.servicer.config_reads == 1   # read once, then kept
