"""The FastAPI app: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, all through
Triton's gRPC.

The event loop only moves bytes: parsing the body and decoding base64 images run in worker threads, remote images
are fetched asynchronously, and the images themselves are decoded by the model in Triton. A client that goes away
cancels its Triton requests. Bodies over the request limit get 413 (body_limit.py); the model's image limits are
read from its Triton config (limits.py) and checked before any image is decoded or fetched.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import answers
from .body_limit import BodyLimit
from .completion_responses import TextCompletionShape, text_completion
from .completions import prepare_completion
from .errors import OpenAIError
from .fanout import Fanout, plan_choices
from .limits import LimitsCache, image_cap, request_cap
from .media import MediaFetcher
from .options import FrontOptions
from .responses import ChatShape, Completion
from .served_models import ServedModels
from .translate import TritonRequest, prepare
from .triton_client import TritonClient

DISCONNECT_POLL_S = 0.1   # how often a client waiting for its whole answer is checked for having gone
CLIENT_GONE = 499         # nginx's "client closed request"; nobody reads it


class _ClientGone(Exception):
    pass


def create_app(options: FrontOptions) -> FastAPI:
    served = ServedModels(options.names)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(options)   # these three in the server's event loop
        app.state.limits = LimitsCache(app.state.triton.model_config)
        app.state.media = MediaFetcher(options.media_timeout_s)
        yield
        await app.state.media.close()
        await app.state.triton.close()

    async def request_limit() -> int:
        if options.max_request_bytes is not None:
            return options.max_request_bytes
        return request_cap(await app.state.limits.get(), None)

    app = FastAPI(title="bunny-triton: OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=request_limit)
    started = int(time.time())

    @app.exception_handler(OpenAIError)
    async def openai_error(_request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        return JSONResponse(OpenAIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request, e: Exception):
        return JSONResponse(OpenAIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/health")
    async def health():
        if await app.state.triton.ready():
            return Response(status_code=200)
        raise OpenAIError(503, f"the model {options.model!r} is not ready on Triton at {options.triton_url} "
                          "(or Triton cannot be reached yet)")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started,
                                            "owned_by": "bunny-triton"} for name in served.names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            prepared = await _prepare(request, prepare)
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        shape = ChatShape(prepared.top_logprobs, prepared.return_token_ids)
        return await _answer(request, app.state.triton, prepared, Completion(prepared.model), shape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            prepared = await _prepare(request, prepare_completion)
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        shape = TextCompletionShape(prepared.top_logprobs, prepared.return_token_ids)
        return await _answer(request, app.state.triton, prepared, text_completion(prepared.model), shape)

    async def _prepare(request: Request, translate) -> TritonRequest:
        """The body translated off the event loop, remote images fetched, every image attached."""
        body = await request.body()
        limits = await app.state.limits.get()
        prepared = await asyncio.to_thread(translate, body, served, limits, options.allowed_media_domains)
        if any(image.url for image in prepared.images):
            await _until_gone(request, app.state.media.fetch_all(prepared.images, image_cap(limits)))
        prepared.attach_images()
        return prepared

    return app


async def _answer(request: Request, triton: TritonClient, prepared: TritonRequest, c: Completion, shape) -> Response:
    """Run every choice's Triton request; the whole answer, or a stream once every choice has its first response
    (so a request the model refuses gets its status line)."""
    fan = Fanout(triton, plan_choices(prepared), c.id)
    streaming = False
    try:
        if not prepared.stream:
            return JSONResponse(await _until_gone(request, answers.whole(c, shape, fan)))
        started = await _until_gone(request, fan.until_each_started())
        streaming = True   # the stream closes the fan-out from here on
    except _ClientGone:
        return Response(status_code=CLIENT_GONE)
    finally:
        if not streaming:
            await fan.aclose()
    return StreamingResponse(answers.events(c, shape, fan, started, prepared.include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _until_gone(request: Request, awaitable: Awaitable):
    """Await `awaitable`, cancelling it (and so its Triton request) if the HTTP client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
