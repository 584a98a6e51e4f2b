"""Engine level: steps that decode running streams and prefill newcomers in one forward give every request the
greedy tokens it gets alone (text, images, staggered arrivals, chunked prefill, prefix hits, preemption)."""
from collections import Counter

import pytest
import torch

from bunny_backend.engine.worker.kv_cache import bytes_per_block
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.model.config import BunnyConfig
from engine_helpers import QUESTIONS, make_engine, run_all, twelve_requests


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


def watch_steps(engine) -> Counter:
    """Counts the engine's steps by kind: decode, prefill or mixed."""
    kinds = Counter()
    schedule = engine.scheduler.schedule

    def watched():
        out = schedule()
        if out.seqs:
            kinds["mixed" if 0 < out.num_decodes < len(out.seqs) else "decode" if out.num_decodes else "prefill"] += 1
        return out

    engine.scheduler.schedule = watched
    return kinds


def one_at_a_time(model_path, reqs):
    engine = make_engine(model_path, enable_prefix_caching=False)
    return {rid: run_all(engine, [(0, rid, text, images, params)])[rid] for _, rid, text, images, params in reqs}


def with_repeats(test_images):
    """Twelve staggered requests plus two that repeat an earlier prompt and image (prefix-cache hits)."""
    params = SamplingParams(max_tokens=10)
    return twelve_requests(test_images) + [(2, "again1", QUESTIONS[1], [test_images[1]], params),
                                           (5, "again2", QUESTIONS[1], [test_images[1]], params)]


@pytest.mark.parametrize("prefill_bound", [8, 0], ids=["8-tokens-while-decoding", "device-default"])
def test_mixed_steps_match_one_at_a_time(model_path, test_images, prefill_bound):
    reqs = with_repeats(test_images)
    engine = make_engine(model_path, max_prefill_tokens_while_decoding=prefill_bound)
    kinds = watch_steps(engine)
    results = run_all(engine, reqs)
    assert kinds["mixed"] > 3 and engine.stats().prefix_cache_hit_tokens > 0
    assert results == one_at_a_time(model_path, reqs)
    assert engine.stats().kv_blocks_used == 0


def test_mixed_steps_under_preemption_match_one_at_a_time(model_path, test_images):
    cfg = BunnyConfig.from_pretrained(model_path)
    blocks = 2 * (cfg.num_image_tokens + 60) // 4       # about two image requests at a time
    engine = make_engine(model_path, block_size=4, max_prefill_tokens_while_decoding=8,
                         kv_cache_memory_bytes=blocks * bytes_per_block(cfg.text, 4, torch.float32))
    kinds = watch_steps(engine)
    reqs = with_repeats(test_images)[:8]
    results = run_all(engine, reqs)
    assert engine.stats().num_preemptions > 0 and kinds["mixed"] > 0
    assert results == one_at_a_time(model_path, reqs)
    assert engine.stats().kv_blocks_used == 0


def test_a_long_prompt_never_stalls_the_running_streams(model_path):
    """Every step while the long prompt prefills also gives each running stream its next token."""
    engine = make_engine(model_path, max_num_batched_tokens=512, max_prefill_tokens_while_decoding=16)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"s{i}", QUESTIONS[i], [], params)
    started = set()
    while len(started) < 3:   # the streams are streaming when the long prompt comes (a burst is not spread)
        started |= {o.request_id for o in engine.step() if o.delta_token_ids}
    engine.add_request("long", "word " * 200, [], SamplingParams(max_tokens=2))
    got_first = False
    steps = 0
    while not got_first:
        outs = {o.request_id: o for o in engine.step()}
        got_first = "long" in outs
        assert all(len(outs[f"s{i}"].delta_token_ids) == 1 for i in range(3))
        steps += 1
    assert steps >= 200 // 16
