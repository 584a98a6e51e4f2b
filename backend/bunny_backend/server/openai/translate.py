"""An OpenAI chat request -> the Triton model's inputs (docs/api/triton-model.md). CPU work (JSON, base64): run it
off the event loop.

Each message becomes {"role", "content"} of the model's `messages` input; its parts are joined with "\\n" and each
image part becomes an `<image>` placeholder where it stands (an image before the text gives Bunny's own
"<image>\\n{text}"). The images go, in order, to the `image` input: data URLs are decoded here (after their count
and sizes are checked against the model's limits), remote ones are fetched by the app (media.MediaFetcher).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from bunny_backend.io.conversation import IMAGE_TOKEN

from .errors import bad_request
from .limits import ImageLimits
from .media import ImageSource, check_and_decode, image_source
from .protocol import ChatCompletionRequest, ChatMessage, SamplingFields, parse_request
from .sampling import choices_per_prompt, logprobs_input, sampling_inputs
from .served_models import ServedModels
from .structured_output import response_format_input

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
    model: str = ""    # the served name the request used, which its answer carries
    images: list[ImageSource] = field(default_factory=list)   # in order; remote ones still to fetch

    def attach_images(self) -> None:
        """The `image` input, once every image's bytes are known."""
        if self.images:
            self.inputs["image"] = np.array([image.data for image in self.images], dtype=object)


def prepare(body: bytes, served: ServedModels, limits: ImageLimits | None = None,
            allowed_hosts: tuple[str, ...] = ()) -> TritonRequest:
    """The whole translation of one HTTP body; OpenAIError naming the problem (404 for a model not served)."""
    request = parse_request(body)
    model = served.resolve(request.model)
    prepared = to_triton(request, allowed_hosts)
    check_and_decode(prepared.images, limits)
    prepared.model = model
    return prepared


def to_triton(request: ChatCompletionRequest, allowed_hosts: tuple[str, ...] = ()) -> TritonRequest:
    if not request.messages:
        raise bad_request("messages must not be empty", param="messages")
    messages, images = [], []
    for i, message in enumerate(request.messages):
        messages.append(_message(i, message, images, allowed_hosts))
    inputs = {"messages": _bytes([json.dumps(messages, ensure_ascii=False)]),
              "stream": np.array([bool(request.stream)])}
    top_logprobs = _top_logprobs(request)
    inputs.update(sampling_inputs(request, _max_tokens(request), logprobs_input(top_logprobs, "top_logprobs")))
    inputs.update(stop_input(request))
    inputs.update(response_format_inputs(request))
    return TritonRequest(inputs, bool(request.stream), include_usage(request), bool(request.return_token_ids),
                         n=choices_per_prompt(request), top_logprobs=top_logprobs, images=images)


def stop_input(request: SamplingFields) -> dict[str, np.ndarray]:
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    return {"stop": _bytes(stop)} if stop else {}


def response_format_inputs(request: SamplingFields) -> dict[str, np.ndarray]:
    """The model's `response_format` input from OpenAI's response_format or vLLM's guided_* fields, if any."""
    response_format = response_format_input(request)
    return {} if response_format is None else {"response_format": _bytes([response_format])}


def include_usage(request: SamplingFields) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def _top_logprobs(request: ChatCompletionRequest) -> int | None:
    """How many alternatives each token lists (None: no logprobs); top_logprobs needs logprobs true, as in OpenAI."""
    if not request.logprobs:
        if request.top_logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        return None
    return request.top_logprobs or 0


def _message(i: int, message: ChatMessage, images: list[ImageSource], allowed_hosts: tuple[str, ...]) -> dict:
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
            images.append(image_source(part.image_url.url, where, allowed_hosts))
            pieces.append(IMAGE_TOKEN)
        elif part.type in ("text", "image_url"):
            raise bad_request(f"{where}: a {part.type} part needs its {part.type!r} field", param=where)
        else:
            raise bad_request(f"{where}: content part type {part.type!r} is not supported; parts are text and "
                              "image_url", param=where)
    return {"role": role, "content": "\n".join(pieces)}


def _max_tokens(request: ChatCompletionRequest) -> int | None:
    if request.max_completion_tokens is not None and request.max_tokens not in (None, request.max_completion_tokens):
        raise bad_request("max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
    return request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens


def _bytes(strings: list[str]) -> np.ndarray:
    return np.array([s.encode("utf-8", "surrogatepass") for s in strings], dtype=object)
