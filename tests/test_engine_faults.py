"""Engine level: a request that breaks the forward fails alone; limits refuse what is too big or too much."""

import pytest
from PIL import Image

import fault_injection
from bunny_backend.engine.outputs import BadRequestError, ServerBusyError
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.image import preprocess_image, shrink_for_square
from image_bytes import encode, png_header_only
from engine_helpers import QUESTIONS, make_engine, run_all

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


@pytest.fixture
def faulty_engine(model_path, monkeypatch):
    monkeypatch.setenv(*fault_injection.ENGINE_HOOKS)
    return make_engine(model_path, max_num_batched_tokens=4096)


def staggered(test_images, with_fault: bool):
    arrivals = [(i, f"r{i}", QUESTIONS[i], [test_images[i % 4]] if i % 2 else [], GREEDY) for i in range(6)]
    if with_fault:
        arrivals.insert(3, (1, "bad", "Hello " + fault_injection.FAULT_MARKER, [], GREEDY))
    return arrivals


def test_a_faulty_request_fails_alone_and_the_batch_is_unchanged(faulty_engine, test_images, caplog):
    clean = run_all(faulty_engine, staggered(test_images, with_fault=False))
    with caplog.at_level("WARNING", logger="bunny.engine"):
        mixed = run_all(faulty_engine, staggered(test_images, with_fault=True))
    failed_sizes = [int(r.getMessage().split("step of ")[1].split()[0]) for r in caplog.records]
    assert failed_sizes[0] > 1 and failed_sizes[-1] == 1   # a batch failed, then the culprit alone
    ids, _, reason = mixed.pop("bad")
    assert reason == "error" and len(ids) == fault_injection.FAULT_AFTER_TOKENS
    assert mixed == clean
    assert all(r == "length" for _, _, r in clean.values())
    assert faulty_engine.block_manager.num_used_blocks == 0 and faulty_engine.scheduler.num_suspects == 0


def test_the_error_output_names_the_fault(faulty_engine):
    faulty_engine.add_request("bad", "Hi " + fault_injection.FAULT_MARKER, [], GREEDY)
    outs = []
    while faulty_engine.has_unfinished():
        outs += faulty_engine.step()
    final = outs[-1]
    assert final.finished and final.finish_reason == "error" and "InjectedFault" in final.error
    assert faulty_engine.stats().requests_finished.get("error") == 1


def test_the_marker_does_nothing_without_the_environment_switch(model_path):
    engine = make_engine(model_path)
    res = run_all(engine, [(0, "x", "Hi " + fault_injection.FAULT_MARKER, [], GREEDY)])
    assert res["x"][2] == "length"


@pytest.mark.parametrize("kw, text, images, params, needle", [
    (dict(max_image_bytes=1000), "hi", ["big"], GREEDY, "max_image_bytes"),
    (dict(max_image_pixels=10_000), "hi", [png_header_only(200, 200)], GREEDY, "megapixels"),
    (dict(), "hi", [png_header_only(100_000, 100_000)], GREEDY, "megapixels"),
    (dict(max_text_bytes=100), "x" * 101, [], GREEDY, "max_text_bytes"),
    (dict(max_prompt_tokens=20), "word " * 50, [], GREEDY, "max_prompt_tokens"),
    (dict(max_output_tokens=8), "hi", [], GREEDY, "max_output_tokens"),
])
def test_limits_are_named_in_the_error(model_path, test_images, kw, text, images, params, needle):
    engine = make_engine(model_path, **kw)
    images = [test_images[1] if im == "big" else im for im in images]
    with pytest.raises(BadRequestError, match=needle):
        engine.add_request("x", text, images, params)
    assert not engine.has_unfinished()


def test_beyond_the_queue_limit_the_server_is_busy(model_path):
    engine = make_engine(model_path, max_num_seqs=1, max_queued_requests=1)
    engine.add_request("a", "hi", [], GREEDY)
    engine.add_request("b", "hi", [], GREEDY)
    with pytest.raises(ServerBusyError, match="server busy"):
        engine.add_request("c", "hi", [], GREEDY)
    engine.abort("a")
    engine.step()
    engine.add_request("c", "hi", [], GREEDY)   # room again


@pytest.mark.parametrize("size", [(1, 5000), (3000, 2), (1, 1)])
def test_extreme_aspect_ratios_are_preprocessed(model_path, size):
    engine = make_engine(model_path, max_image_pixels=1_000_000)
    res = run_all(engine, [(0, "x", "What is this?", [encode(Image.new("RGB", size, (200, 10, 10)))], GREEDY)])
    assert res["x"][2] == "length"


def test_shrink_for_square_keeps_the_aspect_and_the_limit():
    img = shrink_for_square(Image.new("RGB", (10_000, 10)), max_pixels=1_000_000)
    assert img.size == (1000, 1)
    assert shrink_for_square(Image.new("RGB", (500, 400)), max_pixels=1_000_000).size == (500, 400)
    assert preprocess_image(Image.new("RGB", (40_000, 3)), 32, max_pixels=4_000_000).shape == (3, 32, 32)


def test_faults_under_preemption_and_chunked_prefill(model_path, test_images, monkeypatch):
    """Three faulty requests among twelve, a cache small enough to preempt and prefill chunked in 64-token pieces."""
    monkeypatch.setenv(*fault_injection.ENGINE_HOOKS)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    good = [(i // 3, f"r{i}", QUESTIONS[i % 6], [test_images[i % 4]] if i % 2 else [], params) for i in range(12)]
    bad = [(i, f"bad{i}", f"{QUESTIONS[i]} {fault_injection.FAULT_MARKER}", [], params) for i in (0, 2, 3)]
    clean = run_all(make_engine(model_path, kv_cache_memory_bytes=40 * 8192), good)
    engine = make_engine(model_path, kv_cache_memory_bytes=40 * 8192)
    mixed = run_all(engine, sorted(good + bad, key=lambda a: a[0]))
    assert {rid: mixed.pop(rid)[2] for rid in ("bad0", "bad2", "bad3")} == dict.fromkeys(("bad0", "bad2", "bad3"),
                                                                                          "error")
    assert mixed == clean
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_suspects == 0
    assert engine.block_manager.num_used_blocks == 0
