"""Each token's raw bytes, for logprob outputs: Qwen's byte-level BPE spells every byte as one printable
character (GPT-2's table); this reverses it. A character outside that table (an added token's text) stands for
its own UTF-8; an id the tokenizer does not know (the model's padded vocabulary) has no bytes."""
from __future__ import annotations


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, reversed: printable bytes stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTE_OF = _byte_decoder()


class TokenBytes:
    """`token_bytes(ids) -> list[bytes]`; entries are cached per id."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}

    def __call__(self, ids: list[int]) -> list[bytes]:
        missing = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if missing:
            for i, piece in zip(missing, self._tokenizer.convert_ids_to_tokens(missing)):
                self._cache[i] = _spelled_bytes(piece) if isinstance(piece, str) else b""
        return [self._cache[i] for i in ids]


def _spelled_bytes(piece: str) -> bytes:
    return b"".join(bytes([_BYTE_OF[c]]) if c in _BYTE_OF else c.encode("utf-8") for c in piece)
