"""min_tokens: before that many new tokens, EOS cannot be sampled and stop strings are not looked for; a
min_tokens above max_tokens is refused, naming both."""
import json
import shutil

import numpy as np
import pytest

from bunny_backend.engine.outputs import BadRequestError
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.stub.request_io import InvalidInput, parse_request
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import make_engine, run_all
from model_helpers import prompt_ids, stop_cases

TEXT = "Tell me a story."


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


@pytest.fixture(scope="module")
def free(model_path):
    """The greedy answer to TEXT when nothing stops it: (ids, text)."""
    ids, text, _ = run_all(make_engine(model_path),
                           [(0, "free", TEXT, [], SamplingParams(max_tokens=24, ignore_eos=True))])["free"]
    return ids, text


def reference_greedy_min_tokens(path, eos: list[int], min_tokens: int, max_tokens: int) -> list[int]:
    """The transformers reference, greedy, with the EOS ids' logits at -inf for the first min_tokens tokens."""
    ref, tok = ReferenceBunny.from_pretrained(path), load_tokenizer(path)
    ids, out = prompt_ids(tok, TEXT, False), []
    while len(out) < max_tokens:
        row = ref.logits(ids + out)[-1].clone()
        if len(out) < min_tokens:
            row[eos] = float("-inf")
        out.append(int(row.argmax()))
        if out[-1] in eos:
            break
    return out


def test_eos_waits_for_min_tokens(model_path, free, tmp_path):
    """A checkpoint whose EOS is the 3rd token the model answers with: the request would end there; with
    min_tokens 8 it makes at least 8 tokens, as the reference with EOS masked does."""
    for f in model_path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    eos = free[0][2]
    assert eos not in free[0][:2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    engine = make_engine(tmp_path)
    early = run_all(engine, [(0, "early", TEXT, [], SamplingParams(max_tokens=12))])["early"]
    assert early[0] == free[0][:3] and early[2] == "stop"
    ids, _, reason = run_all(engine, [(0, "held", TEXT, [], SamplingParams(max_tokens=12, min_tokens=8))])["held"]
    assert len(ids) >= 8 and eos not in ids[:8]
    assert ids == reference_greedy_min_tokens(tmp_path, [eos], 8, 12)
    assert reason == ("stop" if ids[-1] == eos else "length")
    sampled = run_all(engine, [(0, f"s{i}", TEXT, [], SamplingParams(max_tokens=10, min_tokens=6, temperature=1.0,
                                                                      seed=i)) for i in range(4)])
    assert all(len(ids) >= 6 and eos not in ids[:6] for ids, _, _ in sampled.values())


def test_stop_strings_wait_for_min_tokens(model_path, free):
    """A stop string the answer reaches early: it ends the request there, unless min_tokens asks for more tokens
    than that; then the text keeps it, and the ids are the free answer's for at least min_tokens."""
    ids, text = free
    stop, cut_text, cut_ids, _ = stop_cases(load_tokenizer(model_path), text, ids)[0]
    engine = make_engine(model_path)
    early = run_all(engine, [(0, "early", TEXT, [], SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop]))])
    assert early["early"] == (cut_ids, cut_text, "stop")
    min_tokens = len(cut_ids) + 3
    got_ids, got_text, _ = run_all(engine, [(0, "late", TEXT, [], SamplingParams(
        max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=min_tokens))])["late"]
    assert len(got_ids) >= min_tokens and got_ids == ids[:len(got_ids)]
    assert got_text.startswith(cut_text + stop)


def test_min_tokens_above_max_tokens_is_refused(model_path):
    with pytest.raises(ValueError, match=r"min_tokens \(9\).*max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=9)
    with pytest.raises(InvalidInput, match=r"min_tokens \(9\).*max_tokens \(4\)"):
        parse_request({"text_input": np.array([b"hi"], dtype=object), "max_tokens": np.array([4], dtype=np.int32),
                       "min_tokens": np.array([9], dtype=np.int32)})
    engine = make_engine(model_path, max_model_len=64)
    with pytest.raises(BadRequestError, match=r"min_tokens \(1000\).*max_tokens \(\d+\).*not given"):
        engine.add_request("r", TEXT, [], SamplingParams(max_tokens=None, min_tokens=1000))

