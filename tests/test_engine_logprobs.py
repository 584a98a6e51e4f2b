"""Engine level, float32 weights: each generated token's logprob is the log-softmax of the transformers reference's
logits at its position, whether the token was chosen greedily or drawn with temperature and penalties (the
logprobs are raw: nothing that chose the token shows in them); the top alternatives are the reference's best."""
import pytest
import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import make_engine
from model_helpers import prompt_ids

ATOL = 1e-4
CASES = {   # name: (text, image index or None, params)
    "greedy-text": ("What is a rabbit?", None, SamplingParams(max_tokens=12, logprobs=5, ignore_eos=True)),
    "greedy-image": ("Describe the image.", 1, SamplingParams(max_tokens=6, logprobs=2, ignore_eos=True)),
    "sampled-penalised": ("Tell me a story about the sea.", None,
                          SamplingParams(max_tokens=16, temperature=0.9, top_k=50, presence_penalty=1.0,
                                         frequency_penalty=0.7, repetition_penalty=1.3, seed=11, logprobs=20,
                                         ignore_eos=True)),
    "no-logprobs": ("How many cats are there?", None, SamplingParams(max_tokens=5, temperature=0.7, seed=3)),
}


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


def run_with_logprobs(engine, requests):
    """requests: {id: (text, images, params)}, all added at once -> {id: (ids, logprobs or None, prompt_tokens)}."""
    got = {rid: ([], None, 0) for rid in requests}
    for rid, (text, images, params) in requests.items():
        engine.add_request(rid, text, images, params)
    while engine.has_unfinished():
        for out in engine.step():
            ids, logprobs, _ = got[out.request_id]
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.delta_token_ids)
                logprobs = (logprobs or []) + out.logprobs
            got[out.request_id] = (ids + out.delta_token_ids, logprobs, out.prompt_tokens)
    return got


def test_logprobs_are_the_reference_log_softmax(model_path, test_images):
    engine = make_engine(model_path)
    requests = {name: (text, [] if image is None else [test_images[image]], params)
                for name, (text, image, params) in CASES.items()}
    results = run_with_logprobs(engine, requests)
    ref, tok = ReferenceBunny.from_pretrained(model_path), load_tokenizer(model_path)
    assert results["no-logprobs"][1] is None
    for name, (text, images, params) in requests.items():
        ids, logprobs, prompt_tokens = results[name]
        if not params.logprobs:
            continue
        assert len(ids) == params.max_tokens and len(logprobs) == len(ids)
        logits = ref.logits(prompt_ids(tok, text, bool(images)) + ids[:-1], ref.pixel_values(images))
        want = torch.log_softmax(logits.double(), dim=-1)[prompt_tokens - 1:]
        assert want.shape[0] == len(ids)
        for t, (token, lp) in enumerate(zip(ids, logprobs)):
            assert abs(lp.logprob - float(want[t, token])) < ATOL, (name, t)
            assert len(lp.top_ids) == len(lp.top_logprobs) == params.logprobs
            assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
            best = want[t].topk(params.logprobs).values
            torch.testing.assert_close(torch.tensor(lp.top_logprobs, dtype=torch.float64), best, rtol=0, atol=ATOL)
            torch.testing.assert_close(want[t, lp.top_ids], best, rtol=0, atol=ATOL)
            if params.greedy:
                assert token in lp.top_ids and lp.top_ids[0] == token, (name, t)
    # the sampled request's penalties did act: some token it drew was not the reference's top choice
    ids, logprobs, _ = results["sampled-penalised"]
    assert any(lp.top_ids[0] != token for token, lp in zip(ids, logprobs))
