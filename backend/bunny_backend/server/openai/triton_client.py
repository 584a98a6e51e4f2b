"""Async gRPC streaming to the Triton model (tritonclient.grpc.aio): one bi-directional stream per request.

The stream of a request that finished is left to end by itself (the server closes it after the final response):
cancelling it then would make Triton 2.51 keep the model referenced. A request abandoned before its final
response (the HTTP client went away) is cancelled, which Triton passes on to the model: its KV blocks are freed.
"""
from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bunny_backend.io.wire import TokenLogprob, read_response

from .errors import OpenAIError, from_triton
from .options import FrontOptions

STREAM_END_TIMEOUT_S = 10.0   # how long the server may take to close a stream after its final response
CONFIG_TIMEOUT_S = 5.0
_ids = itertools.count(1)


@dataclass(slots=True)
class TritonResponse:
    """One response of the model: new text and ids (the delta when streaming), counts, final flags the last."""
    text: str
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    final: bool
    logprobs: list[TokenLogprob] | None = None   # one per id, when the request asked for logprobs


class TritonClient:
    """Create it inside the event loop that will use it (grpc.aio channels belong to their loop)."""

    def __init__(self, options: FrontOptions):
        self.url, self.model = options.triton_url, options.model
        self._headers = dict(options.headers) or None
        self._client = grpcaio.InferenceServerClient(
            options.triton_url, ssl=options.ssl, root_certificates=options.root_certificates,
            private_key=options.private_key, certificate_chain=options.certificate_chain)

    async def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return await self._client.is_model_ready(self.model, headers=self._headers, client_timeout=timeout_s)
        except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError):
            return False

    async def model_config(self) -> dict:
        """The model's config as JSON (get_model_config); raises when Triton or the model cannot be reached."""
        return await self._client.get_model_config(self.model, headers=self._headers, as_json=True,
                                                   client_timeout=CONFIG_TIMEOUT_S)

    async def close(self) -> None:
        await self._client.close()

    async def generate(self, inputs: dict[str, np.ndarray], request_id: str = "") -> AsyncIterator[TritonResponse]:
        """The model's responses to one request, the final one last; raises OpenAIError for an error response or
        a broken connection."""
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        request = {"model_name": self.model, "inputs": tensors, "request_id": request_id or f"openai-{next(_ids)}",
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def one_request():
            yield request

        call = self._client.stream_infer(one_request(), headers=self._headers)
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    finished = True
                    raise from_triton(error.message())
                response = _parse(result)
                if response.final:
                    finished = True
                    await _wait_for_end(call)
                yield response
                if response.final:
                    return
            if not finished:
                raise OpenAIError(503, "the Triton server closed the stream before the final response")
        except grpc.RpcError as e:
            finished = True   # the call is over either way
            status = 503 if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) else 500
            raise OpenAIError(status, f"Triton at {self.url}: {e.code().name}: {e.details()}") from None
        finally:
            if not finished:
                call.cancel()


async def _wait_for_end(call) -> None:
    """Let the server close a finished request's stream (cancelling it instead would keep the model referenced)."""
    async def drain():
        async for _ in call:
            pass

    try:
        await asyncio.wait_for(drain(), STREAM_END_TIMEOUT_S)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass


def _parse(result) -> TritonResponse:
    try:
        r = read_response(result.get_response())
    except ValueError as e:
        raise OpenAIError(500, f"internal error: the model's logprob outputs are malformed: {e}") from None
    return TritonResponse(text=r.text, ids=r.ids, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens or 0,
                          completion_tokens=r.completion_tokens or 0, final=r.final, logprobs=r.logprobs)
