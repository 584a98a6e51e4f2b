"""The one wire schema (bunny_backend.io.wire_schema) against config.pbtxt, read here with its own small parser,
and its ranges and error tags."""
import re
from pathlib import Path

import pytest

from bunny_backend.io import wire_schema

CONFIG = Path(__file__).resolve().parents[1] / "model_repository" / "bunny" / "config.pbtxt"
_ENTRY = re.compile(r'\{\s*name:\s*"(\w+)"\s+data_type:\s*TYPE_(\w+)\s+dims:\s*\[([^\]]*)\]([^}]*)\}')


def _section(text: str, head: str) -> list[tuple[str, str, tuple[int, ...], bool]]:
    body = re.search(rf"^{head}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return [(name, "BYTES" if kind == "STRING" else kind, tuple(int(d) for d in dims.replace(",", " ").split()),
             "optional: true" in rest) for name, kind, dims, rest in _ENTRY.findall(body)]


def test_config_pbtxt_inputs_are_the_schema_s():
    inputs = _section(CONFIG.read_text(), "input")
    assert [(n, t, d) for n, t, d, _ in inputs] == [(t.name, t.datatype, t.dims) for t in wire_schema.INPUTS]
    assert all(optional for *_, optional in inputs)   # text_input too: messages may replace it


def test_config_pbtxt_outputs_are_the_schema_s():
    outputs = _section(CONFIG.read_text(), "output")
    assert [(n, t, d) for n, t, d, _ in outputs] == [(t.name, t.datatype, t.dims) for t in wire_schema.OUTPUTS]


@pytest.mark.parametrize("name, good, bad, words", [
    ("top_p", [1.0, 1e-6], [0.0, 1.5, float("nan")], "top_p must be in (0, 1], got"),
    ("temperature", [0.0, 3.0], [-0.1, float("inf")], "temperature must be >= 0, got"),
    ("repetition_penalty", [0.5], [0.0, -1.0], "repetition_penalty must be > 0, got"),
    ("seed", [0, 2**64 - 1], [-1, 2**64], "seed must be in [0, 2^64), got"),
    ("logprobs", [0, 20], [-1, 21], "logprobs must be in [0, 20], got"),
    ("presence_penalty", [-2.0, 2.0], [-2.5, 2.01], "presence_penalty must be in [-2, 2], got"),
    ("max_tokens", [1], [0], "max_tokens must be >= 1, got"),
])
def test_ranges(name, good, bad, words):
    for value in good:
        assert wire_schema.range_problem(name, value) is None, value
    for value in bad:
        assert wire_schema.range_problem(name, value).startswith(words), value


def test_error_tags_round_trip_and_unknown_messages_carry_none():
    tagged = wire_schema.tag_error("invalid_argument", "max_tokens must be >= 1, got 0")
    assert wire_schema.read_error("in stream: " + tagged) == ("invalid_argument", "max_tokens must be >= 1, got 0")
    assert wire_schema.read_error("[unavailable]  server\nbusy") == ("unavailable", "server busy")
    assert wire_schema.read_error("[bogus] no") == (None, "[bogus] no")
    with pytest.raises(ValueError):
        wire_schema.tag_error("bogus", "x")
