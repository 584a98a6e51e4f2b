"""The model's logprob outputs (io/wire.py's TokenLogprob) in OpenAI's two shapes: chat's `logprobs.content`
entries, and the legacy completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.

A token's `token` string is its bytes decoded as UTF-8 with errors replaced (U+FFFD), as vLLM's tokens read: a
token holding part of a multi-byte character shows "\\ufffd". Its `bytes` are the token's own bytes, so joining the
`bytes` of consecutive tokens gives the text exactly (OpenAI's meaning of the field).
"""
from __future__ import annotations

import codecs

from bunny_backend.io.wire import TokenLogprob

FLOOR = -9999.0   # OpenAI's value for "very unlikely"; -inf (and NaN) are not JSON


def token_string(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def logprob_value(x: float) -> float:
    return x if x >= FLOOR else FLOOR   # NaN compares false too


def chat_content(tokens: list[TokenLogprob], alternatives: int) -> list[dict]:
    """Chat's `choices[i].logprobs.content`: one entry per token, each with its `alternatives` most likely."""
    return [{**_entry(t.bytes, t.logprob),
             "top_logprobs": [_entry(raw, logprob) for _, logprob, raw in t.top[:alternatives]]}
            for t in tokens]


def chat_logprobs(tokens: list[TokenLogprob], alternatives: int) -> dict:
    return {"content": chat_content(tokens, alternatives), "refusal": None}


def _entry(raw: bytes, logprob: float) -> dict:
    return {"token": token_string(raw), "logprob": logprob_value(logprob), "bytes": list(raw)}


class LegacyLogprobs:
    """The legacy completions' logprobs of one choice, taken a piece at a time (a stream's chunks) or at once.

    `text_offset` is each token's offset, in characters, in the choice's text: where the character its first byte
    belongs to starts (so a token that completes a character split over tokens points at that character).
    """

    def __init__(self, alternatives: int):
        self.alternatives = alternatives
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0

    def take(self, tokens: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            out["text_offset"].append(self._chars)
            self._chars += len(self._decoder.decode(t.bytes))
            out["tokens"].append(token_string(t.bytes))
            out["token_logprobs"].append(logprob_value(t.logprob))
            top = {token_string(raw): logprob_value(logprob) for _, logprob, raw in t.top[:self.alternatives]}
            top.setdefault(token_string(t.bytes), logprob_value(t.logprob))   # the chosen token is always listed
            out["top_logprobs"].append(top)
        return out
