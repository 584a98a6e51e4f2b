"""OpenAI's legacy completions objects: a text_completion, and the text_completion events of a stream (the same
object name, as OpenAI and vLLM send them). answers.py drives them, as it does chat's (responses.py)."""
from __future__ import annotations

import uuid

from bunny_backend.io.wire import TokenLogprob

from .logprobs import LegacyLogprobs
from .responses import Completion
from .triton_client import TritonResponse


def text_completion(model: str) -> Completion:
    return Completion(model, id=f"cmpl-{uuid.uuid4().hex}")


class TextCompletionShape:
    """The choices of a completions answer, whole or streamed. `logprobs` None: no logprobs; else the k of the
    request (each position lists the k most likely tokens and the chosen one)."""
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, logprobs: int | None, return_token_ids: bool):
        self.logprobs, self.return_token_ids = logprobs, return_token_ids
        self._streams: dict[int, LegacyLogprobs] = {}   # per choice: the offsets reached so far

    def whole(self, index: int, text: str, ids: list[int], tokens: list[TokenLogprob], reason: str) -> dict:
        logprobs = None if self.logprobs is None else LegacyLogprobs(self.logprobs).take(tokens)
        return self._choice(index, text, logprobs, reason, ids)

    def opening(self, index: int) -> dict | None:
        return None

    def piece(self, index: int, response: TritonResponse) -> dict | None:
        if not (response.text or (response.ids and (self.return_token_ids or self.logprobs is not None))):
            return None
        logprobs = None
        if self.logprobs is not None:
            stream = self._streams.setdefault(index, LegacyLogprobs(self.logprobs))
            logprobs = stream.take(response.logprobs or [])
        return self._choice(index, response.text, logprobs, None, response.ids)

    def finish(self, index: int, reason: str) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def _choice(self, index: int, text: str, logprobs: dict | None, reason: str | None, ids: list[int]) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice
