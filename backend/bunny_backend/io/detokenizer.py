"""Streaming detokenization of generated ids, with stop strings.

Decoding follows vLLM/TGI: decode a short window ids[prefix:] and compare with ids[prefix:read]; the difference is
new text unless it ends in U+FFFD, meaning a multi-byte character is still split over tokens, so we wait. Once the
text is clean the window slides, so each step decodes a handful of tokens whatever the output length.

Stop strings: decoded text passes through a small held buffer. A stop string found in it ends the stream (it and
everything after are never emitted); a suffix that could still grow into a stop string is held until it can't.
"""
from __future__ import annotations

from collections.abc import Iterable

# A real character needs at most 4 tokens; a model that goes this long without completing one is producing invalid
# UTF-8, and we emit it as replacement characters rather than let the window (and the per-step cost) grow.
_MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop)
        if not all(self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.skip_special_tokens = skip_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix_offset = 0     # window start: decoding from here is at a character boundary
        self._read_offset = 0       # ids[prefix:read] is text already taken out of the window
        self._held = ""             # decoded, not emitted: may be the start of a stop string
        self._text = ""
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text

    def add(self, token_id: int, match_stop: bool = True) -> str:
        """Feed one generated id; return the text it finalises (often empty). match_stop false: its text is
        released without looking for stop strings (a request's min_tokens)."""
        if self.stopped or token_id in self._special_ids:
            return ""
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        pending = len(self._ids) - self._read_offset
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            if pending < _MAX_PENDING_TOKENS:
                return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(new_text[len(prefix_text):], final=False, match_stop=match_stop)

    def finish(self) -> str:
        """End of generation: flush the held text and any undecoded tail (an incomplete character decodes as-is)."""
        if self.stopped:
            return ""
        prefix_text, new_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(new_text[len(prefix_text):], final=True)

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset:]
        read = self._read_offset - self._prefix_offset
        decode = self.tokenizer.decode
        kwargs = dict(skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)
        return decode(window[:read], **kwargs), decode(window, **kwargs)

    def _release(self, delta: str, final: bool, match_stop: bool = True) -> str:
        held = self._held + delta
        # Held text never contains a whole stop string, so a match can't start in text already emitted.
        hits = [(held.find(s), s) for s in self.stop_strings] if match_stop else []
        hits = [(at, s) for at, s in hits if at >= 0]
        if hits:
            at, self.stop_string = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            out, self._held = held[:at], ""
        else:
            keep = 0 if final or not match_stop else self._stop_prefix_len(held)
            out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self._text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = max((len(s) for s in self.stop_strings), default=0)
        for n in range(min(len(text), longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return n
        return 0
