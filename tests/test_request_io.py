"""bunny_backend.stub.request_io: request tensors -> ParsedRequest, with a readable message for every bad input."""
from __future__ import annotations

import numpy as np
import pytest

from bunny_backend.stub.request_io import InvalidInput, parse_request, response_arrays


def b(*items) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s for s in items], dtype=object)


def test_defaults_follow_the_contract():
    r = parse_request({"text_input": b("hello"), "image": None})
    assert r.prompt == "hello" and r.images == [] and r.stream is False and r.apply_chat_template is True
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.seed, p.stop, p.ignore_eos) == \
        (256, 0.0, 1.0, 0, 1.0, None, [], False)


def test_messages_become_a_conversation():
    from bunny_backend.io.conversation import Message
    r = parse_request({"messages": b('[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},'
                                     ' {"role": "assistant", "content": "hello"}, {"role": "user", "content": "再见"}]')})
    assert r.prompt == [Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello"),
                        Message("user", "再见")]


def test_every_input_is_read():
    r = parse_request({
        "text_input": b("描述这张图"), "image": b(b"\x89PNG..."), "max_tokens": np.array([7], np.int32),
        "temperature": np.array([0.5], np.float32), "top_p": np.array([0.9], np.float32),
        "top_k": np.array([40], np.int32), "repetition_penalty": np.array([1.1], np.float32),
        "seed": np.array([2**64 - 1], np.uint64), "stop": b("\n", "END"), "ignore_eos": np.array([True]),
        "stream": np.array([True]), "apply_chat_template": np.array([False]), "logprobs": np.array([20], np.int32),
        "presence_penalty": np.array([-2.0], np.float32), "frequency_penalty": np.array([1.5], np.float32),
        "min_tokens": np.array([7], np.int32),
    })
    assert r.prompt == "描述这张图" and r.images == [b"\x89PNG..."] and r.stream and not r.apply_chat_template
    p = r.params
    assert p.max_tokens == 7 and p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert p.top_k == 40 and p.repetition_penalty == pytest.approx(1.1) and p.seed == 2**64 - 1
    assert p.stop == ["\n", "END"] and p.ignore_eos is True
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty, p.min_tokens) == (20, -2.0, 1.5, 7)


@pytest.mark.parametrize("inputs, needle", [
    ({}, "text_input is missing"),
    ({"text_input": b("")}, "text_input is empty"),
    ({"text_input": b("  \n")}, "text_input is empty"),
    ({"text_input": b("a", "b")}, "exactly one string"),
    ({"text_input": b(b"\xff\xfe")}, "not valid UTF-8"),
    ({"text_input": np.array([1], np.int32)}, "text_input must be BYTES"),
    ({"text_input": b("hi"), "messages": b('[{"role": "user", "content": "hi"}]')}, "either text_input or messages"),
    ({"messages": b("[{")}, "messages is not valid JSON"),
    ({"messages": b("[]")}, "messages must be a non-empty JSON list"),
    ({"messages": b('[{"role": "user", "content": 3}]')}, "message 0 (user): content must be a string"),
    ({"messages": b('[{"role": "user", "content": "a", "name": "x"}]')}, "unknown field(s) ['name']"),
    ({"messages": b('[{"role": "tool", "content": "a"}]')}, "roles are system, user and assistant"),
    ({"messages": b('[{"role": "assistant", "content": "a"}]')}, "message 0 is the assistant's where the user's"),
    ({"messages": b('[{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]')},
     "only the first message may be one"),
    ({"messages": b('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]')},
     "the last message must be the user's"),
    ({"messages": b('[{"role": "system", "content": "s"}]')}, "no user message"),
    ({"messages": b('[{"role": "user", "content": " "}]')}, "message 0 (user) is empty"),
    ({"text_input": b("hi"), "image": b(b"")}, "image 0 is empty"),
    ({"text_input": b("hi"), "max_tokens": np.array([0], np.int32)}, "max_tokens must be >= 1"),
    ({"text_input": b("hi"), "max_tokens": np.array([1.5], np.float32)}, "max_tokens must be INT32"),
    ({"text_input": b("hi"), "max_tokens": np.array([1, 2], np.int32)}, "exactly one value"),
    ({"text_input": b("hi"), "temperature": np.array([-0.1], np.float32)}, "temperature must be >= 0"),
    ({"text_input": b("hi"), "temperature": np.array([np.nan], np.float32)}, "temperature must be a finite"),
    ({"text_input": b("hi"), "top_p": np.array([0.0], np.float32)}, "top_p must be in (0, 1]"),
    ({"text_input": b("hi"), "top_p": np.array([1.5], np.float32)}, "top_p must be in (0, 1]"),
    ({"text_input": b("hi"), "top_k": np.array([-1], np.int32)}, "top_k must be >= 0"),
    ({"text_input": b("hi"), "repetition_penalty": np.array([0.0], np.float32)}, "repetition_penalty must be > 0"),
    ({"text_input": b("hi"), "seed": np.array([-1], np.int64)}, "seed must be in"),
    ({"text_input": b("hi"), "stop": b("")}, "stop strings must not be empty"),
    ({"text_input": b("hi"), "logprobs": np.array([21], np.int32)}, "logprobs must be in [0, 20]"),
    ({"text_input": b("hi"), "presence_penalty": np.array([2.5], np.float32)}, "presence_penalty must be in [-2, 2]"),
    ({"text_input": b("hi"), "frequency_penalty": np.array([-3], np.float32)}, "frequency_penalty must be in [-2, 2]"),
    ({"text_input": b("hi"), "min_tokens": np.array([-1], np.int32)}, "min_tokens must be >= 0"),
    ({"text_input": b("hi"), "max_tokens": np.array([3], np.int32), "min_tokens": np.array([5], np.int32)},
     "min_tokens (5) is more than max_tokens (3)"),
    ({"text_input": b("hi"), "stream": np.array([1], np.int32)}, "stream must be BOOL"),
    ({"text_input": b("hi"), "bogus": np.array([1])}, "unknown input"),
])
def test_bad_inputs_name_the_problem(inputs, needle):
    with pytest.raises(InvalidInput) as err:
        parse_request(inputs)
    assert needle in str(err.value)


def test_response_arrays_have_the_contract_types():
    out = response_arrays("héllo", [5, 6], "stop", 12, 2)
    assert out["text_output"].dtype == object and out["text_output"].tolist() == ["héllo".encode()]
    assert out["output_ids"].dtype == np.int32 and out["output_ids"].tolist() == [5, 6]
    assert out["finish_reason"].tolist() == [b"stop"]
    assert out["prompt_tokens"].dtype == np.int32 and out["prompt_tokens"].tolist() == [12]
    assert out["completion_tokens"].tolist() == [2]
    empty = response_arrays("", [], None, 3, 0)
    assert empty["output_ids"].shape == (0,) and empty["finish_reason"].tolist() == [b""]


def test_only_the_outputs_asked_for_are_built():
    out = response_arrays("hi", [1, 2], "", 3, 2, frozenset({"output_ids", "completion_tokens"}))
    assert sorted(out) == ["completion_tokens", "output_ids"] and out["output_ids"].tolist() == [1, 2]
    assert sorted(response_arrays("hi", [1], "", 3, 1, None)) == sorted(
        ["text_output", "output_ids", "finish_reason", "prompt_tokens", "completion_tokens"])


def test_response_format_reaches_the_engine_as_sent():
    """Its grammar is the engine's to check and compile (tests/test_structured_output.py)."""
    text = '{"type": "regex", "regex": "[a-z]+"}'
    assert parse_request({"text_input": b("hi"), "response_format": b(text)}).params.response_format == text
    assert parse_request({"text_input": b("hi")}).params.response_format is None
    with pytest.raises(InvalidInput, match="response_format must hold exactly one string"):
        parse_request({"text_input": b("hi"), "response_format": b(text, text)})
