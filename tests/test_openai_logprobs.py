"""Logprobs in OpenAI's shapes, token by token (the model's outputs are read back by io/wire.read_response,
tests/test_logprob_outputs.py): token strings of bytes that are not UTF-8 alone, text offsets over a character split between tokens, and the
floor for -inf. The expected values are written out by hand."""
from __future__ import annotations

import json
import math

import numpy as np
from tritonclient.utils import serialize_byte_tensor

from bunny_backend.io.wire import TokenLogprob
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
