"""OpenAI's chat response objects (a chat.completion, the chat.completion.chunk events of a stream) and what every
answer shares: the ids, finish reasons, usage and server-sent events. answers.py drives them; the legacy
text_completion objects are in completion_responses.py.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from bunny_backend.io.wire import TokenLogprob

from . import logprobs as lp
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class ChatShape:
    """The choices of a chat answer, whole or streamed. `top_logprobs` None: no logprobs."""
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, top_logprobs: int | None, return_token_ids: bool):
        self.top_logprobs, self.return_token_ids = top_logprobs, return_token_ids

    def whole(self, index: int, text: str, ids: list[int], tokens: list[TokenLogprob], reason: str) -> dict:
        choice = {"index": index, "message": {"role": "assistant", "content": text},
                  "logprobs": self._logprobs(tokens), "finish_reason": reason}
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, index: int, response: TritonResponse) -> dict | None:
        """A streamed response's choice; None when it brings nothing to show."""
        if not (response.text or (response.ids and (self.return_token_ids or self.top_logprobs is not None))):
            return None
        choice = {"index": index, "delta": {"content": response.text},
                  "logprobs": self._logprobs(response.logprobs or []), "finish_reason": None}
        if self.return_token_ids:
            choice["token_ids"] = response.ids
        return choice

    def finish(self, index: int, reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}

    def _logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        return None if self.top_logprobs is None else lp.chat_logprobs(tokens, self.top_logprobs)
