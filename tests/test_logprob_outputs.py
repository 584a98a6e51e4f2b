"""The logprob outputs from the engine's records to the client's: each token's bytes (Qwen's byte-level BPE
undone), the arrays the model sends (response_arrays), and what io/wire.py reads back from a gRPC response."""
from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from bunny_backend.engine.outputs import TokenLogprobs
from bunny_backend.io.token_bytes import TokenBytes
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.io.wire import read_response
from bunny_backend.stub.request_io import response_arrays

TEXT = "Rabbits 吃胡萝卜 🥕, naïve café!"
LOGPROB_OUTPUTS = ("output_logprobs", "output_token_bytes", "top_logprob_ids", "top_logprobs", "top_token_bytes")


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_token_bytes_concatenate_to_the_text(tokenizer):
    """The bytes of a text's tokens, joined, are the text's UTF-8, even where a character is split over tokens;
    an added token is its own text; an id past the tokenizer's vocabulary has none."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = TokenBytes(tokenizer)(ids)
    assert b"".join(pieces) == TEXT.encode("utf-8")
    assert any(not _is_utf8(p) for p in pieces)    # some token holds part of a character
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert TokenBytes(tokenizer)([eos, len(tokenizer) + 5, ids[0]]) == [b"<|endoftext|>", b"", pieces[0]]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _serialize_bytes(items) -> bytes:
    return b"".join(len(x).to_bytes(4, "little") + x for x in items)


def _grpc_response(arrays: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
    """The ModelInferResponse Triton's gRPC frontend makes of a response's output arrays."""
    response = service_pb2.ModelInferResponse(model_name="bunny", id="r1")
    for name, array in arrays.items():
        response.outputs.add(name=name, shape=list(array.shape))
        raw = _serialize_bytes(array.reshape(-1)) if array.dtype == object else array.tobytes()
        response.raw_output_contents.append(raw)
    response.parameters["triton_final_response"].bool_param = True
    return response


def records(ids, k):
    return [TokenLogprobs(-0.5 - j, [ids[j]] + [(ids[j] + i) % 300 for i in range(1, k)],
                          [-0.5 - j - 0.25 * i for i in range(k)]) for j in range(len(ids))]


@pytest.mark.parametrize("k", [1, 3])
def test_the_arrays_sent_read_back_as_one_record_per_token(tokenizer, k):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    lps = records(ids, k)
    arrays = response_arrays(TEXT, ids, "stop", 10, len(ids), None, lps, k, TokenBytes(tokenizer))
    n = len(ids)
    assert arrays["output_logprobs"].dtype == np.float32 and arrays["output_logprobs"].shape == (n,)
    assert arrays["output_token_bytes"].shape == (n,) and arrays["output_token_bytes"].dtype == object
    assert arrays["top_logprob_ids"].dtype == np.int32 and arrays["top_logprob_ids"].shape == (n, k)
    assert arrays["top_logprobs"].shape == arrays["top_token_bytes"].shape == (n, k)
    got = read_response(_grpc_response(arrays))
    assert got.ids == ids and len(got.logprobs) == n
    for token, lp, rec in zip(ids, got.logprobs, lps):
        assert (lp.id, lp.logprob) == (token, rec.logprob)
        if _is_utf8(lp.bytes):
            assert lp.bytes.decode("utf-8") == tokenizer.decode([token])
        assert [t.id for t in lp.top] == rec.top_ids and [t.logprob for t in lp.top] == rec.top_logprobs
        assert [t.bytes for t in lp.top] == TokenBytes(tokenizer)(rec.top_ids)
    assert b"".join(lp.bytes for lp in got.logprobs) == TEXT.encode("utf-8")


def test_no_logprob_outputs_unless_asked_and_only_those_named(tokenizer):
    plain = response_arrays("hi", [1, 2], "", 3, 2)
    assert not set(LOGPROB_OUTPUTS) & set(plain)
    assert read_response(_grpc_response(plain)).logprobs is None
    empty = response_arrays("", [], "cancelled", 3, 0, None, [], 2, TokenBytes(tokenizer))
    assert empty["top_logprobs"].shape == empty["top_token_bytes"].shape == (0, 2)
    assert read_response(_grpc_response(empty)).logprobs == []
    named = response_arrays("hi", [1, 2], "", 3, 2, frozenset({"output_ids", "output_logprobs"}), records([1, 2], 2),
                            2, TokenBytes(tokenizer))
    assert sorted(named) == ["output_ids", "output_logprobs"]
    got = read_response(_grpc_response(named)).logprobs
    assert [(lp.id, lp.logprob, lp.top) for lp in got] == [(1, -0.5, []), (2, -1.5, [])]


def test_misaligned_records_are_refused(tokenizer):
    with pytest.raises(ValueError, match="2 logprob records for 3 tokens"):
        response_arrays("hi", [1, 2, 3], "", 3, 3, None, records([1, 2], 1), 1, TokenBytes(tokenizer))
