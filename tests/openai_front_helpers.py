"""The OpenAI front in-process (on a thread, a free port) against the fake Triton of fake_triton_server.py."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.error
import urllib.request

from PIL import Image

from bunny_backend.server.launch import free_ports
from bunny_backend.server.openai.options import FrontOptions
from bunny_backend.server.openai.runner import OpenAIFront
from fake_triton_server import FakeServer


@contextlib.contextmanager
def running_front(triton_url: str, **options):
    """The front's base URL (http://127.0.0.1:PORT) while it runs."""
    port, = free_ports(1)
    front = OpenAIFront("127.0.0.1", port, FrontOptions(triton_url, **options))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        front.stop()


@contextlib.contextmanager
def fake_and_front(parameters: dict[str, str] | None = None, **options):
    """(the fake Triton, the front's base URL)."""
    fake = FakeServer(parameters=parameters)
    try:
        with running_front(fake.url, **options) as url:
            yield fake, url
    finally:
        fake.stop()


def request(url: str, data: bytes | dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST of `data`; retried while the front's thread starts."""
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def chat(text: str = "hi", *image_urls: str, **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls] + [{"type": "text", "text": text}]
    return {"model": "bunny", "messages": [{"role": "user", "content": parts if image_urls else text}], **fields}


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def png(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()
