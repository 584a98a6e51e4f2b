"""OpenAI's response objects: a chat.completion, the chat.completion.chunk events of a stream, usage."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .errors import OpenAIError
from .triton_client import TritonResponse

DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Completion:
    """What every object of one answer shares."""
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def finish_reason(response: TritonResponse) -> str:
    """`stop` or `length`; a request the server cancelled (it is shutting down) is an error."""
    if response.finish_reason in ("stop", "length"):
        return response.finish_reason
    raise OpenAIError(503, f"the request ended without an answer ({response.finish_reason or 'no reason'}); the "
                      "server may be shutting down")


def usage(response: TritonResponse) -> dict:
    return {"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens,
            "total_tokens": response.prompt_tokens + response.completion_tokens}


def completion(c: Completion, final: TritonResponse, text: str, ids: list[int] | None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason(final)}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model,
            "choices": [choice], "usage": usage(final)}


def chunk(c: Completion, delta: dict, reason: str | None = None, ids: list[int] | None = None,
          with_usage_field: bool = False) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    if ids is not None:
        choice["token_ids"] = ids
    body = {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": [choice]}
    if with_usage_field:   # stream_options.include_usage: null on every chunk but the last
        body["usage"] = None
    return event(body)


def usage_chunk(c: Completion, final: TritonResponse) -> str:
    return event({"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
                  "choices": [], "usage": usage(final)})


def event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
