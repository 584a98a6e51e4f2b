"""Decode graphs (engine/worker/decode_graphs.py) through EagerCapture: static buffers, padded batch sizes and the scratch
block give the eager engine's tokens. The real torch.cuda capture is checked in test_gpu.py."""
import pytest
import torch

from bunny_backend.engine.worker.decode_graphs import graph_sizes
from bunny_backend.engine.worker.graph_capture import Captured
from bunny_backend.engine.worker.model_runner import ModelRunner
from bunny_backend.engine.sampling_params import SamplingParams
from engine_helpers import make_engine, run_all, twelve_requests


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


class EagerCapture:
    """DecodeGraphs' capture contract without a GPU: replay() re-runs fn on the static buffers into the same
    output tensor."""

    def capture(self, fn):
        out = fn()
        return Captured(lambda: out.copy_(fn()), out)


def with_graphs(engine, max_graph_batch):
    r = engine.runner
    engine.runner = ModelRunner(engine.model, r.backend, r.num_blocks, r.block_size, r.device, r.dtype,
                                graph_capture=EagerCapture(), max_graph_batch=max_graph_batch,
                                max_blocks_per_seq=-(-engine.max_model_len // engine.block_size))
    replays = {"n": 0}
    for captured in engine.runner.graphs.graphs.values():
        replay = captured.replay
        captured.replay = lambda replay=replay: (replays.__setitem__("n", replays["n"] + 1), replay())
    return replays


def test_graph_sizes_cover_every_batch():
    assert graph_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_sizes(1) == [1]


@pytest.mark.parametrize("max_graph_batch", [16, 4], ids=["all-in-graphs", "large-batches-eager"])
def test_graph_decode_gives_the_eager_tokens(model_path, test_images, max_graph_batch):
    reqs = twelve_requests(test_images)
    eager = run_all(make_engine(model_path, max_model_len=256), reqs)
    engine = make_engine(model_path, max_model_len=256)
    replays = with_graphs(engine, max_graph_batch)
    assert run_all(engine, reqs) == eager
    assert replays["n"] > 10
    assert engine.block_manager.num_used_blocks == 0


def test_padding_rows_write_only_the_scratch_block(model_path):
    engine = make_engine(model_path, max_model_len=256)
    with_graphs(engine, 8)
    for i in range(3):   # a batch of 3 runs in the graph for 4
        engine.add_request(f"r{i}", f"question {i}", [], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()   # takes the requests in
    while engine.scheduler.waiting or not all(s.is_prefill_done for s in engine.scheduler.running):
        engine.step()
    assert engine.scheduler.num_running == 3
    seqs = list(engine.scheduler.running)
    new_slots = {s.block_table[(s.num_tokens - 1) // 16] * 16 + (s.num_tokens - 1) % 16 for s in seqs}
    k_cache = engine.runner.kv_caches[0][0]
    before = k_cache.clone()
    engine.step()
    bits = lambda t: t.view(torch.int32)   # bitwise: the unused cache is uninitialised and may hold NaNs
    changed = (bits(k_cache) != bits(before)).flatten(2).any(-1).flatten().nonzero().flatten().tolist()   # slots
    scratch = engine.runner.graphs.scratch_block * 16
    assert set(changed) - set(range(scratch, scratch + 16)) == new_slots


def test_scratch_block_lies_past_the_managed_blocks(model_path):
    engine = make_engine(model_path, max_model_len=256)
    with_graphs(engine, 4)
    assert engine.runner.graphs.scratch_block == engine.block_manager.num_blocks
    assert engine.runner.kv_caches[0][0].shape[0] == engine.block_manager.num_blocks + 1
    assert torch.equal(engine.runner.graphs.tables, torch.full_like(engine.runner.graphs.tables,
                                                                   engine.block_manager.num_blocks))
