"""An OpenAI chat request -> the Triton model's inputs (docs/api/triton-model.md). CPU work (JSON, base64): run it
off the event loop.

Each message becomes {"role", "content"} of the model's `messages` input; its parts are joined with "\\n" and each
image part becomes an `<image>` placeholder where it stands (an image before the text gives Bunny's own
"<image>\\n{text}"). The images go, in order, to the `image` input.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np

from bunny_backend.io import wire_schema
from bunny_backend.io.conversation import IMAGE_TOKEN

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, parse_request
from .structured_output import response_format_input

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_FIELDS_REFUSED = ("tool_calls", "function_call", "audio", "tool_call_id")
INT32_MIN, INT32_MAX = wire_schema.INT32_RANGE


@dataclass(slots=True)
class TritonRequest:
    inputs: dict[str, np.ndarray]
    stream: bool
    include_usage: bool
    return_token_ids: bool


def prepare(body: bytes, served_model: str) -> TritonRequest:
    """The whole translation of one HTTP body; OpenAIError(400) naming the problem."""
    request = parse_request(body)
    if request.model != served_model:
        raise bad_request(f"model {request.model!r} is not served here; this server serves {served_model!r} "
                          "(GET /v1/models)", param="model")
    return to_triton(request)


def to_triton(request: ChatCompletionRequest) -> TritonRequest:
    if not request.messages:
        raise bad_request("messages must not be empty", param="messages")
    messages, images = [], []
    for i, message in enumerate(request.messages):
        messages.append(_message(i, message, images))
    inputs = {"messages": _bytes([json.dumps(messages, ensure_ascii=False)]),
              "stream": np.array([bool(request.stream)])}
    if images:
        inputs["image"] = np.array(images, dtype=object)
    for name, value in _scalars(request).items():
        inputs[name] = value
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if stop:
        inputs["stop"] = _bytes(stop)
    if (response_format := response_format_input(request)) is not None:
        inputs["response_format"] = _bytes([response_format])
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return TritonRequest(inputs, bool(request.stream), include_usage, bool(request.return_token_ids))


def _message(i: int, message: ChatMessage, images: list[bytes]) -> dict:
    role = ROLES.get(message.role)
    if role is None:
        raise bad_request(f"messages[{i}]: role {message.role!r} is not supported; roles are system (or "
                          "developer), user and assistant (no tools)", param=f"messages[{i}].role")
    refused = sorted(k for k in _MESSAGE_FIELDS_REFUSED if (message.model_extra or {}).get(k))
    if refused:
        raise bad_request(f"messages[{i}]: {refused} are not supported (no tools or audio)",
                          param=f"messages[{i}].{refused[0]}")
    if message.content is None:
        raise bad_request(f"messages[{i}] has no content", param=f"messages[{i}].content")
    if isinstance(message.content, str):
        return {"role": role, "content": message.content}
    pieces = []
    for j, part in enumerate(message.content):
        where = f"messages[{i}].content[{j}]"
        if part.type == "text" and part.text is not None:
            pieces.append(part.text)
        elif part.type == "image_url" and part.image_url is not None:
            if role != "user":
                raise bad_request(f"{where}: images are accepted in user messages only", param=where)
            images.append(decode_data_url(part.image_url.url, where))
            pieces.append(IMAGE_TOKEN)
        elif part.type in ("text", "image_url"):
            raise bad_request(f"{where}: a {part.type} part needs its {part.type!r} field", param=where)
        else:
            raise bad_request(f"{where}: content part type {part.type!r} is not supported; parts are text and "
                              "image_url", param=where)
    return {"role": role, "content": "\n".join(pieces)}


def decode_data_url(url: str, where: str) -> bytes:
    """`data:image/...;base64,...` -> the image file's bytes (decoded by the model, which names bad images)."""
    if url.startswith(("http://", "https://")):
        raise bad_request(f"{where}: only data URLs (data:image/...;base64,...) are accepted; this server does "
                          "not fetch remote images", param=where)
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep):
        raise bad_request(f"{where}: image_url must be a data URL: data:image/...;base64,...", param=where)
    media, *params = head[len("data:"):].split(";")
    if not media.startswith("image/") or "base64" not in params:
        raise bad_request(f"{where}: the data URL must be base64 data of type image/..., got {head!r}", param=where)
    try:
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 data is invalid", param=where) from None
    if not image:
        raise bad_request(f"{where}: the data URL holds no data", param=where)
    return image


def _scalars(request: ChatCompletionRequest) -> dict[str, np.ndarray]:
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if request.max_completion_tokens is not None and request.max_tokens not in (None, request.max_completion_tokens):
        raise bad_request("max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    values = {"max_tokens": max_tokens, "temperature": request.temperature, "top_p": request.top_p,
              "seed": request.seed, "top_k": request.top_k, "repetition_penalty": request.repetition_penalty,
              "ignore_eos": request.ignore_eos}
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        spec = wire_schema.INPUT[name]
        problem = wire_schema.range_problem(name, value)
        if problem is None and spec.datatype == "INT32" and not INT32_MIN <= value <= INT32_MAX:
            problem = f"{name} is out of range: {value}"
        if problem:
            raise bad_request(problem, param=name)
        out[name] = np.array([value], dtype=spec.numpy_dtype)
    return out


def _bytes(strings: list[str]) -> np.ndarray:
    return np.array([s.encode("utf-8", "surrogatepass") for s in strings], dtype=object)
