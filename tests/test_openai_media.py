"""Remote images (http/https image_url parts), in-process: a local web server in the test serves them, the front
fetches them only from the hosts the operator allows, within the model's max_image_bytes and the timeout, follows
redirects within the same host only, and the fake Triton gets the bytes."""
from __future__ import annotations

import http.server
import threading

import pytest

from openai_front_helpers import chat, data_url, fake_and_front, png, request

CAP = 5000
LIMITS = {"max_images_per_request": "2", "max_image_bytes": str(CAP)}
IMAGE = png(8)


class Site:
    """A web server on 127.0.0.1 with the paths the tests need; `hits` counts the requests per path."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.release = threading.Event()   # holds /slow until the test ends
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                route = {"/cat.png": lambda: self._send(IMAGE),
                         "/other.png": lambda: self._send(png(16)),
                         "/big.png": lambda: self._send(bytes(CAP + 1)),
                         "/big-unsized.png": lambda: self._send(bytes(CAP + 1), sized=False),
                         "/exact.png": lambda: self._send(bytes(CAP)),
                         "/same-host": lambda: self._redirect("/cat.png"),
                         "/other-host": lambda: self._redirect(f"http://localhost:{site.port}/cat.png"),
                         "/loop": lambda: self._redirect("/loop"),
                         "/slow.png": self._slow}.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route()

            def _send(self, data: bytes, sized: bool = True):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if sized:
                    self.send_header("Content-Length", str(len(data)))
                else:
                    self.close_connection = True   # the body ends when the connection does
                self.end_headers()
                self.wfile.write(data)

            def _redirect(self, location: str):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _slow(self):
                site.release.wait(60)
                self._send(IMAGE)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def front(site):
    with fake_and_front(LIMITS, allowed_media_domains=("127.0.0.1",), media_timeout_s=1.0) as (fake, url):
        yield fake, url + "/v1/chat/completions"


def test_an_allowed_host_is_fetched_and_the_model_gets_the_bytes(site, front):
    fake, url = front
    status, reply = request(url, chat("what", site.url("/cat.png"), data_url(png(16))))
    assert status == 200 and reply["choices"][0]["message"]["content"].startswith(f"caption {len(IMAGE) % 1000} ")
    assert fake.servicer.images[-1] == [IMAGE, png(16)]   # in order, remote and data URL alike
    status, reply = request(url, chat("two", site.url("/other.png"), site.url("/same-host")))
    assert status == 200 and fake.servicer.images[-1] == [png(16), IMAGE]   # a same-host redirect is followed
    status, reply = request(url, chat("exact", site.url("/exact.png")))
    assert fake.servicer.images[-1] == [bytes(CAP)]   # max_image_bytes itself is allowed


@pytest.mark.parametrize("path, host, needle", [
    ("/cat.png", "localhost", "does not fetch images from 'localhost' (it allows 127.0.0.1; the operator names the "
                              "hosts with --allowed-media-domains)"),
    ("/other-host", "127.0.0.1", "redirects to http://localhost:"),
    ("/loop", "127.0.0.1", "redirects more than 3 times"),
    ("/big.png", "127.0.0.1", f"is larger than the {CAP} bytes one image may have (max_image_bytes)"),
    ("/big-unsized.png", "127.0.0.1", f"is larger than the {CAP} bytes one image may have (max_image_bytes)"),
    ("/slow.png", "127.0.0.1", "took longer than 1 s (--media-timeout-s)"),
    ("/missing.png", "127.0.0.1", "answered HTTP 404"),
])
def test_what_cannot_be_fetched_is_a_400_naming_the_problem(site, front, path, host, needle):
    fake, url = front
    before = fake.servicer.requests
    status, reply = request(url, chat("x", site.url(path, host)))
    assert status == 400 and needle in reply["error"]["message"], reply
    assert reply["error"]["param"] == "messages[0].content[0]"
    assert fake.servicer.requests == before   # nothing reached the model


def test_a_host_not_allowed_is_never_contacted(site, front):
    fake, url = front
    hits = dict(site.hits)
    status, _ = request(url, chat("x", site.url("/cat.png", "localhost")))
    assert status == 400 and site.hits == hits


def test_an_unreachable_host_is_a_400(front):
    fake, url = front
    from bunny_backend.server.launch import free_ports
    dead, = free_ports(1)
    status, reply = request(url, chat("x", f"http://127.0.0.1:{dead}/cat.png"))
    assert status == 400 and f"cannot fetch http://127.0.0.1:{dead}/cat.png" in reply["error"]["message"]


@pytest.mark.parametrize("image_url, needle", [
    ("file:///etc/passwd", "must be a data URL (data:image/...;base64,...) or an http(s) URL"),
    ("ftp://127.0.0.1/cat.png", "must be a data URL (data:image/...;base64,...) or an http(s) URL"),
    ("data:image/png,rawbytes", "must be base64 data of type image/..."),
    ("data:text/plain;base64,aGk=", "must be base64 data of type image/..."),
])
def test_other_schemes_are_refused(front, image_url, needle):
    fake, url = front
    status, reply = request(url, chat("x", image_url))
    assert status == 400 and needle in reply["error"]["message"]


def test_remote_images_count_against_the_image_limit_before_any_fetch(site, front):
    fake, url = front
    hits = dict(site.hits)
    status, reply = request(url, chat("x", *[site.url("/cat.png")] * 3))
    assert status == 400 and "3 images given; this model takes at most 2" in reply["error"]["message"]
    assert site.hits == hits


def test_without_allowed_domains_no_url_is_fetched(site):
    with fake_and_front(LIMITS) as (fake, url):
        status, reply = request(url + "/v1/chat/completions", chat("x", site.url("/cat.png")))
    assert status == 400 and "it allows none" in reply["error"]["message"]
