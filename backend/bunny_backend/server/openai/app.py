"""The FastAPI app: POST /v1/chat/completions, GET /v1/models, GET /health, all through Triton's gRPC.

The event loop only moves bytes: parsing the body and decoding base64 images run in worker threads, remote images
are fetched asynchronously, and the images themselves are decoded by the model in Triton. A client that goes away
cancels its Triton request. Bodies over the request limit get 413 (body_limit.py); the model's image limits are read
from its Triton config (limits.py) and checked before any image is decoded or fetched.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from . import responses as oai
from .body_limit import BodyLimit
from .errors import OpenAIError
from .limits import LimitsCache, image_cap, request_cap
from .media import MediaFetcher
from .options import FrontOptions
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
        body = await request.body()
        limits = await app.state.limits.get()
        prepared = await asyncio.to_thread(prepare, body, served, limits, options.allowed_media_domains)
        if any(image.url for image in prepared.images):
            try:
                await _until_gone(request, app.state.media.fetch_all(prepared.images, image_cap(limits)))
            except _ClientGone:
                return Response(status_code=CLIENT_GONE)
        prepared.attach_images()
        c = oai.Completion(prepared.model)
        answer = app.state.triton.generate(prepared.inputs, request_id=c.id)
        try:
            if not prepared.stream:
                return JSONResponse(await _until_gone(request, _whole(c, prepared, answer)))
            first = await _until_gone(request, anext(answer))
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        except BaseException:
            await answer.aclose()
            raise
        return StreamingResponse(_events(c, prepared, first, answer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app


async def _whole(c: oai.Completion, prepared: TritonRequest, answer: AsyncIterator) -> dict:
    texts, ids = [], []
    async for response in answer:
        texts.append(response.text)
        ids += response.ids
        if response.final:
            return oai.completion(c, response, "".join(texts), ids if prepared.return_token_ids else None)
    raise OpenAIError(503, "the Triton stream ended without a final response")


async def _events(c: oai.Completion, prepared: TritonRequest, response, answer: AsyncIterator):
    """Server-sent events: a role chunk, one chunk per new piece of text, the finish chunk, usage, [DONE]."""
    usage_field = prepared.include_usage
    try:
        yield oai.chunk(c, {"role": "assistant", "content": ""}, with_usage_field=usage_field)
        while True:
            if response.text or (prepared.return_token_ids and response.ids):
                yield oai.chunk(c, {"content": response.text}, ids=response.ids if prepared.return_token_ids else None,
                                with_usage_field=usage_field)
            if response.final:
                break
            response = await anext(answer)
        yield oai.chunk(c, {}, reason=oai.finish_reason(response), with_usage_field=usage_field)
        if prepared.include_usage:
            yield oai.usage_chunk(c, response)
        yield oai.DONE
    except OpenAIError as e:   # mid-stream: the status line is long gone, so the error is an event
        yield oai.event(e.body())
        yield oai.DONE
    finally:
        await answer.aclose()


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
