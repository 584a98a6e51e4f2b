"""The vision phase and the image-feature (encoder) cache: LRU within its bytes, a repeated image skips the tower,
images of a step are encoded in one batch within the budget, once per request however its prefill is chunked."""
import hashlib

import pytest
import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.worker import kv_cache
from bunny_backend.engine.worker.encoder_cache import EncoderCache
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.model.config import BunnyConfig
from engine_helpers import make_engine, run_all
from model_helpers import pixels_of

PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


def feats(n_bytes: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((n_bytes // 4,), fill, dtype=torch.float32)


# ---- the cache alone --------------------------------------------------------------------------------------------
def test_lru_within_the_byte_bound():
    cache = EncoderCache(capacity_bytes=300)
    for key in (b"a", b"b", b"c"):
        cache.put(key, feats(100))
    assert cache.get(b"a") is not None            # a is now the most recently used
    cache.put(b"d", feats(100))                   # evicts b, the least recently used
    assert b"b" not in cache and all(k in cache for k in (b"a", b"c", b"d"))
    cache.put(b"e", feats(200))                   # needs two entries' room: c and a go
    assert len(cache) == 2 and b"d" in cache and b"e" in cache and cache.num_bytes == 300
    assert cache.evictions == 3 and cache.hits == 1 and cache.get(b"b") is None and cache.misses == 1


def test_too_big_is_not_kept_and_zero_capacity_keeps_nothing():
    cache = EncoderCache(capacity_bytes=100)
    cache.put(b"x", feats(200))
    assert len(cache) == 0 and cache.num_bytes == 0
    cache.put(b"y", feats(100, 1.0))
    cache.put(b"y", feats(100, 2.0))               # replacing an entry counts its bytes once
    assert cache.num_bytes == 100 and cache.get(b"y")[0] == 2.0
    off = EncoderCache(capacity_bytes=0)
    off.put(b"z", feats(4))
    assert b"z" not in off
    with pytest.raises(ValueError, match=">= 0"):
        EncoderCache(-1)


def test_the_memory_plan_counts_the_cache(monkeypatch, model_path):
    text = BunnyConfig.from_pretrained(model_path).text
    per_block = kv_cache.bytes_per_block(text, 16, torch.float32)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 1000 * per_block)

    def plan(cache_bytes, **kw):
        return kv_cache.num_kv_blocks(EngineConfig(kv_cache_memory_fraction=0.5, max_num_seqs=64, **kw), text, 16,
                                      2048, torch.float32, torch.device("cpu"), encoder_cache_bytes=cache_bytes)

    assert plan(0) == 500
    assert plan(100 * per_block) == 400
    assert plan(100 * per_block, kv_cache_memory_bytes=50 * per_block) == 50   # the KV cache's own size
    assert plan(100 * per_block, tensor_parallel_size=2) == 150                # rank 0 of two on one host
    with pytest.raises(ValueError, match="encoder_cache_bytes"):
        plan(500 * per_block)


# ---- in the engine ----------------------------------------------------------------------------------------------
def record_encoder_batches(engine) -> list[int]:
    sizes = []
    encode = engine.model.encode_images

    def recorded(pixels):
        sizes.append(pixels.shape[0])
        return encode(pixels)

    engine.model.encode_images = recorded
    return sizes


def test_a_repeated_image_skips_the_vision_tower(model_path, test_images):
    """Different text before the image, so the prefix cache cannot serve the image rows; the features can."""
    first = (0, "a", "Describe the image.", [test_images[0]], PARAMS)
    second = (0, "b", "Look closely first. <image>\nWhat is in it?", [test_images[0]], PARAMS)
    results = {}
    for capacity in (128 << 20, 0):
        engine = make_engine(model_path, encoder_cache_bytes=capacity)
        batches = record_encoder_batches(engine)
        results[capacity] = {**run_all(engine, [first]), **run_all(engine, [second])}
        stats = engine.stats()
        if capacity:
            assert batches == [1] and stats.encoder_images_total == 1
            assert (stats.encoder_cache_hits, stats.encoder_cache_misses) == (1, 1)
            assert stats.encoder_cache_bytes == engine.model.num_image_tokens * engine.model.config.text.hidden_size * 4
        else:
            assert batches == [1, 1] and stats.encoder_images_total == 2 and stats.encoder_cache_bytes == 0
        assert stats.encoder_seconds_total > 0
    assert results[128 << 20] == results[0]


def test_cached_features_are_the_towers(model_path, test_images):
    engine = make_engine(model_path)
    run_all(engine, [(0, "a", "Describe the image.", [test_images[2]], PARAMS)])
    cached = engine.encoder.cache.get(hashlib.sha256(test_images[2]).digest())
    with torch.inference_mode():
        fresh = engine.model.encode_images(pixels_of(test_images[2], engine.model.config.vision.image_size))[0]
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=1e-6)


def test_the_cache_stays_within_its_bytes(model_path, test_images):
    cfg = BunnyConfig.from_pretrained(model_path)
    one = cfg.num_image_tokens * cfg.text.hidden_size * 4     # float32 features of one image
    engine = make_engine(model_path, encoder_cache_bytes=int(2.5 * one))
    for i, image in enumerate(test_images):
        run_all(engine, [(0, f"r{i}", "Describe the image.", [image], PARAMS)])
    cache = engine.encoder.cache
    assert len(cache) == 2 and cache.num_bytes == 2 * one and cache.evictions == 2
    run_all(engine, [(0, "again", "What is it?", [test_images[3]], PARAMS)])   # the latest is still there
    assert cache.hits == 1 and engine.stats().encoder_images_total == 4


def test_images_of_a_step_are_encoded_in_one_batch_within_the_budget(model_path, test_images):
    reqs = [(0, f"r{i}", "Describe the image.", [image], PARAMS) for i, image in enumerate(test_images)]
    reqs.append((0, "same", "What is it?", [test_images[0]], PARAMS))    # the same image twice in one step
    results = {}
    for budget, expected in ((4, [4]), (1, [1, 1, 1, 1])):
        engine = make_engine(model_path, max_num_batched_tokens=4096, max_images_per_encoder_batch=budget)
        batches = record_encoder_batches(engine)
        results[budget] = run_all(engine, reqs)
        assert batches == expected and engine.stats().encoder_images_total == 4
    assert results[4] == results[1]


def test_an_image_is_encoded_once_however_its_prefill_is_chunked(model_path, test_images):
    engine = make_engine(model_path, max_num_batched_tokens=8, max_num_seqs=8, encoder_cache_bytes=0)
    batches = record_encoder_batches(engine)
    chunk_steps = []
    runner_run = engine.runner.run

    def run(step):
        chunk_steps.append(step.num_new_tokens)
        return runner_run(step)

    engine.runner.run = run
    big = run_all(engine, [(0, "a", "Describe the image.", [test_images[1]], PARAMS)])
    assert batches == [1] and len(chunk_steps) > engine.model.num_image_tokens // 8
    whole = run_all(make_engine(model_path, max_num_batched_tokens=4096),
                    [(0, "a", "Describe the image.", [test_images[1]], PARAMS)])
    assert big == whole
