"""Triton tensors <-> engine types for the model `bunny` (docs/api/triton-model.md). Pure functions over numpy.

`parse_request(inputs)` turns the request's input arrays (name -> array, absent optional inputs left out or
None) into a `ParsedRequest`, or raises `InvalidInput` whose message names the input and the problem. Limits
that depend on the engine's config (image count, sizes, prompt length) are the engine's to check.
`response_arrays(...)` builds the output arrays of one response.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from bunny_backend.engine.core.request_builder import Prompt
from bunny_backend.engine.outputs import TokenLogprobs
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io import wire_schema
from bunny_backend.io.conversation import ConversationError, parse_messages


class InvalidInput(ValueError):
    """A request the adapter refuses before it reaches the engine; the message is shown to the client."""


@dataclass(slots=True)
class ParsedRequest:
    prompt: Prompt              # text_input's string, or messages' conversation
    images: list[bytes] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    apply_chat_template: bool = True


INPUT_NAMES = tuple(t.name for t in wire_schema.INPUTS)


def _scalar(name: str, array: np.ndarray):
    spec = wire_schema.INPUT[name]
    if array.dtype.kind not in wire_schema.DATATYPES[spec.datatype][1]:
        raise InvalidInput(f"{name} must be {spec.datatype}, got {array.dtype}")
    if array.size != 1:
        raise InvalidInput(f"{name} must hold exactly one value (dims [1]), got shape {list(array.shape)}")
    value = array.reshape(-1)[0].item()
    if spec.datatype == "FP32" and not np.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value}")
    if spec.datatype == "INT32" and not wire_schema.INT32_RANGE[0] <= value <= wire_schema.INT32_RANGE[1]:
        raise InvalidInput(f"{name} is out of the INT32 range: {value}")   # an int64 array sent as INT32
    return value


def _byte_strings(name: str, array: np.ndarray) -> list[bytes]:
    if array.dtype.kind not in "OSU":
        raise InvalidInput(f"{name} must be BYTES, got {array.dtype}")
    out = []
    for item in array.reshape(-1):
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, (bytes, np.bytes_)):
            raise InvalidInput(f"{name} must be BYTES, got an element of type {type(item).__name__}")
        out.append(bytes(item))
    return out


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{name} is not valid UTF-8 (byte {e.start})") from None


def _one_string(name: str, array: np.ndarray) -> str:
    values = _byte_strings(name, array)
    if len(values) != 1:
        raise InvalidInput(f"{name} must hold exactly one string (dims [1]), got {len(values)}")
    return _utf8(name, values[0])


def _prompt(arrays: Mapping[str, np.ndarray]) -> Prompt:
    """text_input's text or messages' conversation: exactly one of the two."""
    if "text_input" in arrays and "messages" in arrays:
        raise InvalidInput("give either text_input or messages, not both")
    if "messages" in arrays:
        raw = _one_string("messages", arrays["messages"])
        try:
            return parse_messages(json.loads(raw))
        except json.JSONDecodeError as e:
            raise InvalidInput(f"messages is not valid JSON: {e}") from None
        except ConversationError as e:
            raise InvalidInput(f"messages: {e}") from None
    if "text_input" not in arrays:
        raise InvalidInput("text_input is missing (or give messages)")
    text = _one_string("text_input", arrays["text_input"])
    if not text.strip():
        raise InvalidInput("text_input is empty")
    return text


def parse_request(inputs: Mapping[str, np.ndarray | None]) -> ParsedRequest:
    """Validate and convert one request's inputs; raises InvalidInput naming the problem."""
    unknown = sorted(k for k, v in inputs.items() if v is not None and k not in INPUT_NAMES)
    if unknown:
        raise InvalidInput(f"unknown input(s) {unknown}; this model takes {list(INPUT_NAMES)}")
    arrays = {k: np.asarray(v) for k, v in inputs.items() if v is not None}

    prompt = _prompt(arrays)
    images = _byte_strings("image", arrays["image"]) if "image" in arrays else []
    for i, data in enumerate(images):
        if not data:
            raise InvalidInput(f"image {i} is empty")

    stop = [_utf8("stop", s) for s in _byte_strings("stop", arrays["stop"])] if "stop" in arrays else []
    if any(not s for s in stop):
        raise InvalidInput("stop strings must not be empty")

    values = {name: _scalar(name, arrays[name]) for name in wire_schema.SCALAR_INPUTS if name in arrays}
    response_format = _one_string("response_format", arrays["response_format"]) if "response_format" in arrays \
        else None

    def value(name):
        return values.get(name, wire_schema.INPUT[name].default)

    max_tokens = value("max_tokens")
    if "max_tokens" not in values and value("rest_of_context"):
        max_tokens = None
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(value("temperature")), top_p=float(value("top_p")),
            top_k=int(value("top_k")), repetition_penalty=float(value("repetition_penalty")),
            seed=values.get("seed"), stop=stop, ignore_eos=bool(value("ignore_eos")),
            logprobs=int(value("logprobs")), presence_penalty=float(value("presence_penalty")),
            frequency_penalty=float(value("frequency_penalty")), min_tokens=int(value("min_tokens")),
            response_format=response_format,
        )
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    return ParsedRequest(prompt=prompt, images=images, params=params, stream=bool(value("stream")),
                         apply_chat_template=bool(value("apply_chat_template")))


def response_arrays(text: str, token_ids: list[int], finish_reason: str | None, prompt_tokens: int,
                    completion_tokens: int, names: frozenset | None = None,
                    logprobs: list[TokenLogprobs] | None = None, top_k: int = 0,
                    token_bytes: Callable[[list[int]], list[bytes]] | None = None) -> dict[str, np.ndarray]:
    """The output arrays of one response (finish_reason empty before the final one); only those in `names`, the
    outputs the client asked for, when given (Triton would drop the others after they were built and sent).
    logprobs (one per token id, for a request that asked for `top_k` of them; None: it did not) add the logprob
    outputs, with each token's bytes from token_bytes."""
    build = {
        "text_output": lambda: np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": lambda: np.asarray(token_ids, dtype=np.int32).reshape(-1),
        "finish_reason": lambda: np.array([(finish_reason or "").encode()], dtype=np.object_),
        "prompt_tokens": lambda: np.array([prompt_tokens], dtype=np.int32),
        "completion_tokens": lambda: np.array([completion_tokens], dtype=np.int32),
    }
    if logprobs is not None:
        build.update(_logprob_builders(token_ids, logprobs, top_k, token_bytes))
    return {name: make() for name, make in build.items() if names is None or name in names}


def _logprob_builders(token_ids: list[int], logprobs: list[TokenLogprobs], k: int, token_bytes) -> dict:
    n = len(token_ids)
    if len(logprobs) != n or any(len(t.top_ids) != k for t in logprobs):
        raise ValueError(f"{len(logprobs)} logprob records for {n} tokens, or top lists not of {k}")

    def byte_strings(ids: list[int]) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.object_)
        out[:] = token_bytes(ids)
        return out

    return {
        "output_logprobs": lambda: np.array([t.logprob for t in logprobs], dtype=np.float32),
        "output_token_bytes": lambda: byte_strings(list(token_ids)),
        "top_logprob_ids": lambda: np.array([t.top_ids for t in logprobs], dtype=np.int32).reshape(n, k),
        "top_logprobs": lambda: np.array([t.top_logprobs for t in logprobs], dtype=np.float32).reshape(n, k),
        "top_token_bytes": lambda: byte_strings([i for t in logprobs for i in t.top_ids]).reshape(n, k),
    }


def requested_outputs(request) -> frozenset | None:
    """The output names a request asked for (Triton prunes the others after they are built: build only these);
    None: all of them."""
    try:
        names = request.requested_output_names()
    except Exception:   # noqa: BLE001 - a backend without it: build them all
        return None
    return frozenset(names) or None
