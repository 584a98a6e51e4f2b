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
from dataclasses import dataclass, field

import numpy as np

from bunny_backend.io.conversation import IMAGE_TOKEN

from .errors import bad_request
from .protocol import ChatCompletionRequest, ChatMessage, SamplingFields, parse_request
from .sampling import choices_per_prompt, logprobs_input, sampling_inputs

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_FIELDS_REFUSED = ("tool_calls", "function_call", "audio", "tool_call_id")


@dataclass(slots=True)
class TritonRequest:
    """What one HTTP request asks of the model: for each prompt, n choices, each one Triton request of `inputs`
    and the prompt's own inputs (fanout.py gives each its seed)."""
    inputs: dict[str, np.ndarray]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    n: int = 1
    top_logprobs: int | None = None   # None: no logprobs; else how many alternatives each token lists
    prompts: list[dict[str, np.ndarray]] = field(default_factory=lambda: [{}])


def prepare(body: bytes, served_model: str) -> TritonRequest:
    """The whole translation of one HTTP body; OpenAIError(400) naming the problem."""
    request = parse_request(body)
    check_model(request, served_model)
    return to_triton(request)


def check_model(request: SamplingFields, served_model: str) -> None:
    if request.model != served_model:
        raise bad_request(f"model {request.model!r} is not served here; this server serves {served_model!r} "
                          "(GET /v1/models)", param="model")


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
    top_logprobs = _top_logprobs(request)
    inputs.update(sampling_inputs(request, _max_tokens(request), logprobs_input(top_logprobs, "top_logprobs")))
    inputs.update(stop_input(request))
    return TritonRequest(inputs, bool(request.stream), include_usage(request), bool(request.return_token_ids),
                         n=choices_per_prompt(request), top_logprobs=top_logprobs)


def stop_input(request: SamplingFields) -> dict[str, np.ndarray]:
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    return {"stop": _bytes(stop)} if stop else {}


def include_usage(request: SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _top_logprobs(request: ChatCompletionRequest) -> int | None:
    """How many alternatives each token lists (None: no logprobs); top_logprobs needs logprobs true, as in OpenAI."""
    if not request.logprobs:
        if request.top_logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        return None
    return request.top_logprobs or 0


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


def _max_tokens(request: ChatCompletionRequest) -> int | None:
    if request.max_completion_tokens is not None and request.max_tokens not in (None, request.max_completion_tokens):
        raise bad_request("max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens


def _bytes(strings: list[str]) -> np.ndarray:
    return np.array([s.encode("utf-8", "surrogatepass") for s in strings], dtype=object)
