"""The FastAPI app: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, all through
Triton's gRPC.

The event loop only moves bytes: parsing the body and decoding base64 images run in worker threads, and the
images themselves are decoded by the model in Triton. A client that goes away cancels its Triton requests.
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
from .completion_responses import TextCompletionShape, text_completion
from .completions import prepare_completion
from .errors import OpenAIError
from .fanout import Fanout, plan_choices
from .responses import ChatShape, Completion
from .translate import TritonRequest, prepare
from .triton_client import TritonClient

DISCONNECT_POLL_S = 0.1   # how often a client waiting for its whole answer is checked for having gone
CLIENT_GONE = 499         # nginx's "client closed request"; nobody reads it


class _ClientGone(Exception):
    pass


def create_app(triton_url: str, model_name: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.triton = TritonClient(triton_url, model_name)   # in the server's event loop
        yield
        await app.state.triton.close()

    app = FastAPI(title="bunny-triton: OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        raise OpenAIError(503, f"the model {model_name!r} is not ready on Triton at {triton_url}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "bunny-triton"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        prepared = await asyncio.to_thread(prepare, await request.body(), model_name)
        shape = ChatShape(prepared.top_logprobs, prepared.return_token_ids)
        return await _answer(request, app.state.triton, prepared, Completion(model_name), shape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        prepared = await asyncio.to_thread(prepare_completion, await request.body(), model_name)
        shape = TextCompletionShape(prepared.top_logprobs, prepared.return_token_ids)
        return await _answer(request, app.state.triton, prepared, text_completion(model_name), shape)

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
