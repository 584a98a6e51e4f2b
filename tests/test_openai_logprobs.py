"""Logprobs in OpenAI's shapes, token by token: the model's raw logprob outputs read back (io/wire.read_logprobs),
token strings of bytes that are not UTF-8 alone, text offsets over a character split between tokens, and the
floor for -inf. The expected values are written out by hand."""
from __future__ import annotations

import json
import math

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from bunny_backend.io.wire import TokenLogprob, read_logprobs
from bunny_backend.server.openai.logprobs import LegacyLogprobs, chat_content

E_ACUTE = "é".encode()   # b"\xc3\xa9": two bytes, here one per token


def tokens() -> list[TokenLogprob]:
    return [TokenLogprob(1, -0.5, b"caf", [(1, -0.5, b"caf"), (7, -1.5, b"cab")]),
            TokenLogprob(2, -0.25, E_ACUTE[:1], [(2, -0.25, E_ACUTE[:1]), (8, -math.inf, b"x")]),
            TokenLogprob(3, -math.inf, E_ACUTE[1:] + b"!", [(3, float("nan"), E_ACUTE[1:] + b"!"), (9, -2.0, b"?")]),
            TokenLogprob(4, -1.0, b" ok", [(4, -1.0, b" ok"), (5, -3.0, b" no")])]


def test_chat_entries_keep_the_bytes_and_replace_broken_characters():
    content = chat_content(tokens(), 1)
    assert [e["token"] for e in content] == ["caf", "\ufffd", "\ufffd!", " ok"]
    assert [e["bytes"] for e in content] == [[99, 97, 102], [0xC3], [0xA9, 33], [32, 111, 107]]
    assert bytes(b for e in content for b in e["bytes"]).decode() == "café! ok"
    assert [e["logprob"] for e in content] == [-0.5, -0.25, -9999.0, -1.0]
    assert [e["top_logprobs"] for e in content][2] == [{"token": "\ufffd!", "logprob": -9999.0, "bytes": [0xA9, 33]}]
    assert all(len(e["top_logprobs"]) == 1 for e in content)
    json.dumps(content, allow_nan=False)


def test_legacy_offsets_point_into_the_text_in_one_piece_or_many():
    want = {"tokens": ["caf", "\ufffd", "\ufffd!", " ok"], "token_logprobs": [-0.5, -0.25, -9999.0, -1.0],
            "top_logprobs": [{"caf": -0.5, "cab": -1.5}, {"\ufffd": -0.25, "x": -9999.0},
                             {"\ufffd!": -9999.0, "?": -2.0}, {" ok": -1.0, " no": -3.0}],
            # "café! ok": the split é is the character at 3, and "!" follows it at 4
            "text_offset": [0, 3, 3, 5]}
    assert LegacyLogprobs(2).take(tokens()) == want
    pieces = LegacyLogprobs(2)
    got = [pieces.take(tokens()[:2]), pieces.take(tokens()[2:3]), pieces.take(tokens()[3:])]
    assert {k: sum((g[k] for g in got), []) for k in want} == want


def test_legacy_top_logprobs_with_k_0_list_the_chosen_token():
    assert LegacyLogprobs(0).take(tokens()[:1])["top_logprobs"] == [{"caf": -0.5}]


def _raw(ids, logprobs, token_bytes, top_ids, top_logprobs, top_bytes) -> dict[str, bytes]:
    def text(items):
        return serialize_byte_tensor(np.array(items, dtype=object)).item() if items else b""
    return {"output_ids": np.array(ids, "<i4").tobytes(), "output_logprobs": np.array(logprobs, "<f4").tobytes(),
            "output_token_bytes": text(token_bytes), "top_logprob_ids": np.array(top_ids, "<i4").tobytes(),
            "top_logprobs": np.array(top_logprobs, "<f4").tobytes(), "top_token_bytes": text(top_bytes)}


def test_read_logprobs_from_raw_outputs():
    raw = _raw([5, 6], [-0.5, -0.25], [b"a", b"\xc3"], [5, 1, 2, 6, 3, 4], [-0.5, -1, -2, -0.25, -3, -4],
               [b"a", b"b", b"c", b"\xc3", b"d", b"e"])
    assert read_logprobs(raw) == [TokenLogprob(5, -0.5, b"a", [(5, -0.5, b"a"), (1, -1.0, b"b"), (2, -2.0, b"c")]),
                                  TokenLogprob(6, -0.25, b"\xc3", [(6, -0.25, b"\xc3"), (3, -3.0, b"d"),
                                                                   (4, -4.0, b"e")])]
    assert read_logprobs({"output_ids": b""}) is None
    assert read_logprobs(_raw([], [], [], [], [], [])) == []
