"""Requests to the Triton model `bunny` (docs/api/triton-model.md): input tensors, responses, one stream.

`RequestOptions` -> `build_inputs()` -> InferInput tensors; `BunnyStream.generate()` sends one request over
a gRPC bi-directional stream and yields `Delta`s, the last one with `final=True`. A stream carries one
request at a time, so an error (which tritonclient hands back without the request id) is that request's.
Every failure, server down or a Triton error in a response, surfaces as `BunnyClientError`.
"""
from __future__ import annotations

import itertools
import json
import queue
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bunny_backend.io import wire_schema
from bunny_backend.io.wire import TokenLogprob, read_response

MODEL_NAME = "bunny"
DEFAULT_URL = "127.0.0.1:8001"
_ids = itertools.count(1)


class BunnyClientError(RuntimeError):
    """The server is unreachable, the model is not ready, or it answered a request with an error."""


@dataclass(slots=True)
class RequestOptions:
    """One request's inputs; None leaves the server's default (docs/api/triton-model.md). `messages` (a list of
    {"role", "content"}) replaces `text` with a whole conversation."""

    text: str = ""
    images: list[bytes] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool | None = None
    stream: bool = False
    apply_chat_template: bool | None = None
    messages: list[dict] | None = None
    logprobs: int | None = None             # k > 0: each token's logprob and the k most likely tokens
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None


def _tensor(name: str, datatype: str, array: np.ndarray, batched: bool) -> grpcclient.InferInput:
    if batched:  # a model with max_batch_size > 0 takes a leading batch dimension
        array = array[np.newaxis, ...]
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(opts: RequestOptions, batched: bool = False) -> list[grpcclient.InferInput]:
    """The InferInput tensors for one request; optional inputs are sent only when set."""
    if opts.messages is not None:
        prompt = ("messages", json.dumps(opts.messages, ensure_ascii=False))
    else:
        prompt = ("text_input", opts.text)
    inputs = [_tensor(prompt[0], "BYTES", np.array([prompt[1].encode()], dtype=object), batched)]
    if opts.images:
        inputs.append(_tensor("image", "BYTES", np.array(list(opts.images), dtype=object), batched))
    for name in wire_schema.SCALAR_INPUTS:
        value = getattr(opts, name, None)
        if value is not None and name != "stream":
            spec = wire_schema.INPUT[name]
            inputs.append(_tensor(name, spec.datatype, np.array([value], dtype=spec.numpy_dtype), batched))
    if opts.stop:
        inputs.append(_tensor("stop", "BYTES", np.array([s.encode() for s in opts.stop], dtype=object), batched))
    inputs.append(_tensor("stream", "BOOL", np.array([opts.stream], dtype=np.bool_), batched))
    return inputs


@dataclass(slots=True)
class Delta:
    """One response: new text and ids (the delta when streaming), arrival time, counts; final flags the last."""

    text: str
    ids: list[int]
    t: float
    final: bool
    finish_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    request_id: str = ""
    logprobs: list[TokenLogprob] | None = None   # one per id when the request asked for logprobs


def parse_response(result, t: float) -> Delta:
    """A Delta from a tritonclient InferResult (an empty flags-only final response included), read from the
    response's raw contents (bunny_backend.io.wire)."""
    r = read_response(result.get_response())
    return Delta(text=r.text, ids=r.ids, t=t, final=r.final, finish_reason=r.finish_reason,
                 prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, logprobs=r.logprobs)


def describe_error(err: Exception, url: str) -> str:
    """One readable line for a tritonclient/gRPC failure."""
    status = str(getattr(err, "status", lambda: "")() or "")
    msg = (err.message() if hasattr(err, "message") else str(err)) or str(err)
    code, msg = wire_schema.read_error(str(msg))
    if code is not None:   # the model's own error: its message, without the code in front
        return msg
    if "UNAVAILABLE" in status or "failed to connect" in msg.lower() or "connection refused" in msg.lower():
        return f"cannot reach the Triton server at {url} (is it running?)"
    if "DEADLINE_EXCEEDED" in status:
        return f"the Triton server at {url} did not answer in time"
    return msg


class BunnyStream:
    """One gRPC client and stream to the model; requests on it are sent one at a time."""

    def __init__(self, url: str = DEFAULT_URL, model: str = MODEL_NAME, timeout_s: float = 600.0):
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._responses: queue.Queue = queue.Queue()
        try:
            self._client = grpcclient.InferenceServerClient(url)
            if not self._client.is_server_live(client_timeout=10):
                raise BunnyClientError(f"the Triton server at {url} is not live")
            if not self._client.is_model_ready(model, client_timeout=10):
                raise BunnyClientError(f"model '{model}' is not ready on the Triton server at {url}")
            config = self._client.get_model_config(model, client_timeout=10).config
            self.batched = config.max_batch_size > 0
            self._client.start_stream(callback=self._on_response)
        except InferenceServerException as err:
            raise BunnyClientError(describe_error(err, url)) from None

    def _on_response(self, result, error):
        self._responses.put((result, error, time.perf_counter()))

    def generate(self, opts: RequestOptions) -> Iterator[Delta]:
        """Send one request; yield its responses until the final one. Raises BunnyClientError."""
        while not self._responses.empty():  # leftovers of an abandoned request
            self._responses.get_nowait()
        request_id = f"bunny-client-{next(_ids)}"
        self._in_flight = True
        try:
            self._client.async_stream_infer(
                self.model, build_inputs(opts, self.batched), request_id=request_id,
                enable_empty_final_response=True,
            )
        except InferenceServerException as err:
            raise BunnyClientError(describe_error(err, self.url)) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                result, error, t = self._responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BunnyClientError(f"no response from {self.url} within {self.timeout_s:.0f}s") from None
            if error is not None:
                raise BunnyClientError(describe_error(error, self.url))
            if result.get_response().id not in ("", request_id):
                continue  # a late response of an earlier request
            delta = parse_response(result, t)
            delta.request_id = request_id
            if delta.final:
                self._in_flight = False
            yield delta
            if delta.final:
                return

    def close(self) -> None:
        try:
            # Cancel only an unfinished request: Triton 2.51 keeps a model referenced (and then hangs its
            # shutdown until --exit-timeout-secs) when a stream is cancelled after its final response.
            self._client.stop_stream(cancel_requests=getattr(self, "_in_flight", False))
            self._client.close()
        except Exception:  # closing a broken channel must not hide the real error
            pass

    def __enter__(self) -> "BunnyStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
