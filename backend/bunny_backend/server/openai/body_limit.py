"""413 for a request body over the front's limit: from Content-Length before any of it is read, and while a chunked
body arrives (counted as the app reads it; uvicorn holds back the rest, so no more than the limit is buffered)."""
from __future__ import annotations

import json
from typing import Awaitable, Callable

from .errors import OpenAIError

TOO_LARGE = 413


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(TOO_LARGE, f"the request body is larger than the {limit} bytes this server takes "
                       "(--max-request-bytes)")


class BodyLimit:
    """ASGI middleware; `limit()` gives the current limit in bytes."""

    def __init__(self, app, limit: Callable[[], Awaitable[int]]):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = await self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _answer(send, too_large(limit))
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)   # in the route's body read: the app's OpenAIError handler answers
            return message

        await self.app(scope, counted, send)


async def _answer(send, error: OpenAIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
