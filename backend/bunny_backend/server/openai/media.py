"""Images of image_url parts: data URLs (decoded here) and http/https URLs of hosts the operator allows (fetched
here, like vLLM's --allowed-media-domains). Sizes are checked before anything is decoded or kept: a data URL's from
its base64 length, a download's from its Content-Length and as it arrives. What the bytes hold is for the model to
say (it names an unreadable image)."""
from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from .errors import bad_request
from .limits import ImageLimits

MAX_REDIRECTS = 3          # same-host redirects followed for one image
READ_CHUNK = 64 << 10
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(slots=True)
class ImageSource:
    """One image_url part: `data` once known; `url` while it still has to be fetched."""
    where: str                  # e.g. messages[1].content[0], for error messages
    data: bytes | None = None
    b64: str | None = None      # a data URL's base64 payload, until decoded
    url: str | None = None      # an http(s) URL of an allowed host


def image_source(url: str, where: str, allowed_hosts: tuple[str, ...]) -> ImageSource:
    """What an image_url's url names; OpenAIError(400) for anything but a base64 image data URL or an http(s) URL of
    an allowed host. Nothing is decoded or fetched yet."""
    scheme = url.partition(":")[0].lower()
    if scheme in ("http", "https"):
        host = urlsplit(url).hostname
        if not host:
            raise bad_request(f"{where}: the image URL has no host", param=where)
        if host not in allowed_hosts:
            allowed = f"it allows {', '.join(allowed_hosts)}" if allowed_hosts else "it allows none"
            raise bad_request(f"{where}: this server does not fetch images from {host!r} ({allowed}; the operator "
                              "names the hosts with --allowed-media-domains); send the image as a data URL "
                              "(data:image/...;base64,...)", param=where)
        return ImageSource(where, url=url)
    head, sep, payload = url.partition(",")
    if scheme != "data" or not sep:
        raise bad_request(f"{where}: image_url must be a data URL (data:image/...;base64,...) or an http(s) URL",
                          param=where)
    media, *params = head[len("data:"):].split(";")
    if not media.startswith("image/") or "base64" not in params:
        raise bad_request(f"{where}: the data URL must be base64 data of type image/..., got {head!r}", param=where)
    if not payload:
        raise bad_request(f"{where}: the data URL holds no data", param=where)
    return ImageSource(where, b64=payload)


def base64_size(payload: str) -> int:
    """The bytes that base64 text decodes to (for valid base64: len * 3/4 minus the padding)."""
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")) if len(payload) % 4 == 0 else 0)


def check_and_decode(images: list[ImageSource], limits: ImageLimits | None) -> None:
    """The count and each data URL's size against the model's limits, then the data URLs decoded (CPU: run off the
    event loop)."""
    if limits is not None:
        limits.check_count(len(images))
        for image in images:
            if image.b64 is not None:
                limits.check_size(base64_size(image.b64), image.where)
    for image in images:
        if image.b64 is not None:
            image.data, image.b64 = decode_base64(image.b64, image.where), None


def decode_base64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 data is invalid", param=where) from None


class MediaFetcher:
    """Fetches the remote images of a request, all at once, each within the timeout and the size cap. Create it in
    the event loop that uses it."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._session = aiohttp.ClientSession()   # a compressed body is capped as it decompresses

    async def close(self) -> None:
        await self._session.close()

    async def fetch_all(self, images: list[ImageSource], cap: int) -> None:
        remote = [image for image in images if image.url is not None]
        if not remote:
            return
        try:
            async with asyncio.TaskGroup() as group:   # the first failure cancels the other fetches
                tasks = [group.create_task(self.fetch(image.url, image.where, cap)) for image in remote]
        except ExceptionGroup as e:
            raise e.exceptions[0] from None
        for image, task in zip(remote, tasks):
            image.data, image.url = task.result(), None

    async def fetch(self, url: str, where: str, cap: int) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(url, where, cap)
        except TimeoutError:
            raise bad_request(f"{where}: fetching {url} took longer than {self.timeout_s:g} s (--media-timeout-s)",
                              param=where) from None
        except aiohttp.ClientError as e:
            raise bad_request(f"{where}: cannot fetch {url}: {type(e).__name__}: {e}", param=where) from None

    async def _follow(self, url: str, where: str, cap: int) -> bytes:
        host = urlsplit(url).hostname
        for _ in range(MAX_REDIRECTS + 1):
            async with self._session.get(url, allow_redirects=False) as r:
                if r.status in _REDIRECTS and "Location" in r.headers:
                    target = urljoin(url, r.headers["Location"])
                    parts = urlsplit(target)
                    if parts.scheme not in ("http", "https") or parts.hostname != host:
                        raise bad_request(f"{where}: {url} redirects to {target}, another host; only redirects "
                                          "within the same host are followed", param=where)
                    url = target
                    continue
                if r.status != 200:
                    raise bad_request(f"{where}: fetching {url} answered HTTP {r.status} {r.reason or ''}".rstrip(),
                                      param=where)
                return await _read_capped(r, url, where, cap)
        raise bad_request(f"{where}: {url} redirects more than {MAX_REDIRECTS} times", param=where)


async def _read_capped(r: aiohttp.ClientResponse, url: str, where: str, cap: int) -> bytes:
    too_large = f"{where}: {url} is larger than the {cap} bytes one image may have (max_image_bytes)"
    if r.content_length is not None and r.content_length > cap:
        raise bad_request(too_large, param=where)
    data = bytearray()
    async for piece in r.content.iter_chunked(READ_CHUNK):
        data += piece
        if len(data) > cap:
            raise bad_request(too_large, param=where)
    if not data:
        raise bad_request(f"{where}: {url} sent no data", param=where)
    return bytes(data)
