"""Engine level: continuous batching over the paged cache gives the reference's greedy outputs."""
import json
import shutil
import time

import pytest
import torch

from bunny_backend.engine.outputs import BadRequestError
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.tokenizer import eos_token_ids, load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from engine_helpers import QUESTIONS, make_engine, run_all, twelve_requests
from model_helpers import prompt_ids


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


@pytest.fixture(scope="module")
def reference(model_path):
    return ReferenceBunny.from_pretrained(model_path), load_tokenizer(model_path)


def reference_greedy(reference, text, image, max_tokens):
    ref, tok = reference
    ids = prompt_ids(tok, text, image is not None)
    return ref.generate_greedy(ids, ref.pixel_values([image] if image else []), max_new_tokens=max_tokens,
                               eos_token_ids=eos_token_ids(ref.model_path, tok))


def assert_matches_reference(results, reqs, reference):
    for _, rid, text, images, params in reqs:
        expected = reference_greedy(reference, text, images[0] if images else None, params.max_tokens)
        assert results[rid][0] == expected, rid


def test_staggered_batch_matches_reference_one_by_one(model_path, reference, test_images):
    engine = make_engine(model_path)
    reqs = twelve_requests(test_images)
    results = run_all(engine, reqs)
    assert_matches_reference(results, reqs, reference)
    assert engine.stats().kv_blocks_used == 0


def test_preemption_keeps_outputs(model_path, reference, test_images):
    from bunny_backend.engine.worker.kv_cache import bytes_per_block
    from bunny_backend.model.config import BunnyConfig
    cfg = BunnyConfig.from_pretrained(model_path)
    blocks = 2 * (cfg.num_image_tokens + 60) // 4       # about two image requests at a time
    engine = make_engine(model_path, block_size=4,
                         kv_cache_memory_bytes=blocks * bytes_per_block(cfg.text, 4, torch.float32))
    reqs = twelve_requests(test_images)[:6]
    results = run_all(engine, reqs)
    assert engine.stats().num_preemptions > 0
    assert_matches_reference(results, reqs, reference)
    assert engine.stats().kv_blocks_used == 0


def test_prefix_cache_hits_and_same_output(model_path, test_images):
    engine = make_engine(model_path)
    params = SamplingParams(max_tokens=8)
    first = run_all(engine, [(0, "a", "Describe the image.", [test_images[0]], params)])
    assert engine.stats().prefix_cache_hit_tokens == 0
    second = run_all(engine, [(0, "b", "Describe the image.", [test_images[0]], params)])
    assert engine.stats().prefix_cache_hit_tokens > engine.model.num_image_tokens
    assert second["b"][0] == first["a"][0]
    no_cache = run_all(make_engine(model_path, enable_prefix_caching=False),
                       [(0, "c", "Describe the image.", [test_images[0]], params)])
    assert no_cache["c"][0] == first["a"][0]


def test_abort_mid_prefill_and_mid_decode_frees_blocks(model_path, test_images):
    engine = make_engine(model_path, max_num_batched_tokens=16)
    engine.add_request("p", "Describe the image.", [test_images[0]], SamplingParams(max_tokens=50))
    engine.add_request("d", "What is a rabbit?", [], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()                      # "p" is partly prefilled
    engine.abort("p")
    outs = engine.step()
    assert any(o.request_id == "p" and o.finish_reason == "cancelled" for o in outs)
    for _ in range(12):
        engine.step()
    engine.abort("d")
    final = engine.step()
    assert any(o.request_id == "d" and o.finish_reason == "cancelled" for o in final)
    assert not engine.has_unfinished()
    assert engine.stats().kv_blocks_used == 0


def test_an_abort_of_an_unknown_request_is_dropped_and_the_idle_engine_waits_again(model_path):
    engine = make_engine(model_path)
    engine.abort("finished-a-moment-ago")
    assert engine.has_unfinished()
    assert engine.step() == []
    assert not engine.has_unfinished()
    t0 = time.monotonic()
    engine.wait_for_work(0.3)
    assert time.monotonic() - t0 > 0.2


def test_seeded_sampling_reproducible_alone_and_in_batch(model_path, test_images):
    params = dict(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_all(make_engine(model_path), [(0, "s", "Tell me a story.", [], SamplingParams(**params))])
    others = [(0, f"o{i}", QUESTIONS[i], [test_images[0]] if i % 2 else [],
               SamplingParams(max_tokens=10, temperature=1.0, seed=i)) for i in range(4)]
    batched = run_all(make_engine(model_path), others[:2] + [(1, "s", "Tell me a story.", [], SamplingParams(**params))]
                      + others[2:])
    assert alone["s"][0] == batched["s"][0]
    greedy = run_all(make_engine(model_path), [(0, "g", "Tell me a story.", [], SamplingParams(max_tokens=12, ignore_eos=True))])
    topk1 = run_all(make_engine(model_path), [(0, "k", "Tell me a story.", [],
                                                SamplingParams(max_tokens=12, temperature=1.0, top_k=1, seed=7, ignore_eos=True))])
    assert greedy["g"][0] == topk1["k"][0]


def test_the_engine_seed_decides_unseeded_sampling(model_path):
    params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    reqs = [(0, f"u{i}", QUESTIONS[i], [], params) for i in range(3)]
    first = run_all(make_engine(model_path, seed=7), reqs)
    assert run_all(make_engine(model_path, seed=7), reqs) == first
    assert run_all(make_engine(model_path, seed=8), reqs) != first


def test_generation_stops_at_every_eos_id_of_the_checkpoint(model_path, tmp_path):
    """generation_config.json's eos_token_id list decides, for the engine and for the reference alike."""
    for f in model_path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    text, params = "Tell me a story.", SamplingParams(max_tokens=12)
    free = run_all(make_engine(tmp_path), [(0, "a", text, [], params)])["a"][0]
    extra = free[3]
    tok = load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, extra]}))
    ids, _, reason = run_all(make_engine(tmp_path), [(0, "b", text, [], params)])["b"]
    assert ids == free[:free.index(extra) + 1] and reason == "stop"
    assert ReferenceBunny.from_pretrained(tmp_path).chat(tok, text, None, max_new_tokens=12)[0] == ids


def test_context_defaults_to_the_trained_length(checkpoint_factory):
    path = checkpoint_factory(seed=5, num_kv_heads=2, tokenizer_model_max_length=100)
    engine = make_engine(path)
    assert engine.max_model_len == 100 and engine.model.config.text.max_position_embeddings == 2048
    with pytest.raises(BadRequestError, match="context of 100 tokens"):
        engine.add_request("x", "hi", [], SamplingParams(max_tokens=100))
    assert make_engine(path, max_model_len=300).max_model_len == 300


def test_streamed_chinese_equals_whole_decode(model_path):
    # Random weights may emit byte sequences that are not UTF-8 at all, so U+FFFD can be in the whole decode
    # too; streaming must add none of its own (tests/test_detokenizer.py streams real Chinese text).
    engine = make_engine(model_path)
    res = run_all(engine, [(0, "zh", "请用中文描述一只兔子。", [], SamplingParams(max_tokens=40, ignore_eos=True))])
    ids, text, reason = res["zh"]
    assert reason == "length" and len(ids) == 40
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_requests_that_cannot_fit_are_refused(model_path, test_images):
    engine = make_engine(model_path, max_model_len=64)
    with pytest.raises(BadRequestError, match="max_tokens|context|long"):
        engine.add_request("x", "hi", [], SamplingParams(max_tokens=1000))
    with pytest.raises(BadRequestError, match="image"):
        engine.add_request("y", "hi", [b"not an image"], SamplingParams())
    with pytest.raises(BadRequestError, match="at most 1"):
        engine.add_request("z", "hi", [test_images[0], test_images[1]], SamplingParams())
    assert not engine.has_unfinished()


def test_top_k_and_repetition_penalty_through_the_engine_against_the_reference(model_path, reference, test_images):
    """Requests with repetition_penalty (greedy) and top_k (sampled), in one batch with images and chunked prefill.
    The oracle: the transformers reference's logits, teacher-forced on the engine's own tokens, through transformers'
    RepetitionPenaltyLogitsProcessor over the prompt's and the output's ids: a greedy row must take that argmax, a
    top_k row one of its k best; the penalty must change the greedy answer, and top_k=3 must not be greedy."""
    from transformers import RepetitionPenaltyLogitsProcessor

    ref, tok = reference
    greedy = dict(max_tokens=16, ignore_eos=True)
    reqs = [(0, "pen", QUESTIONS[0], [], SamplingParams(repetition_penalty=1.8, **greedy)),
            (0, "pen-img", QUESTIONS[1], [test_images[0]], SamplingParams(repetition_penalty=1.5, **greedy)),
            (1, "k3", QUESTIONS[4], [], SamplingParams(temperature=1.0, top_k=3, seed=3, **greedy)),
            (1, "k3-pen-img", QUESTIONS[3], [test_images[1]],
             SamplingParams(temperature=1.0, top_k=3, repetition_penalty=1.3, seed=4, **greedy)),
            (2, "plain", QUESTIONS[0], [], SamplingParams(**greedy))]
    results = run_all(make_engine(model_path), reqs)
    off_argmax = 0
    for _, rid, text, images, params in reqs:
        prompt, new = prompt_ids(tok, text, bool(images)), results[rid][0]
        assert len(new) == 16, rid
        logits = ref.logits(prompt + new[:-1], ref.pixel_values(images) if images else None)
        first = logits.shape[0] - len(new)   # the row that chose the first new token: the prompt's last
        seen = [t for t in prompt if t >= 0]
        for j, token in enumerate(new):
            row = logits[first + j].unsqueeze(0)
            if params.repetition_penalty != 1.0:
                row = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(
                    torch.tensor([seen + new[:j]]), row.clone())
            if params.top_k:
                assert token in row[0].topk(params.top_k).indices.tolist(), (rid, j)
                off_argmax += token != int(row[0].argmax())
            else:
                assert token == int(row[0].argmax()), (rid, j)
    assert results["pen"][0] != results["plain"][0]   # the penalty changed the greedy answer
    assert off_argmax > 0                              # top_k sampled, not greedy
