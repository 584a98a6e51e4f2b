"""Mixed-step graphs (engine/worker/mixed_graphs.py) and the LM head with greedy argmax inside the graphs: a padded
step gives the eager step's logits and tokens (graph_step_cases.py: portable attention here, the Triton kernels in
Triton's interpreter, real capture on a GPU), and whole engine runs with every step in a graph give the eager
engine's outputs, sampled and logprob rows included."""
import os
import subprocess
import sys

import pytest
import torch

import graph_step_cases
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker.mixed_graphs import token_sizes
from bunny_backend.engine.worker.model_runner import ModelRunner
from bunny_backend.ops.triton_support import triton
from engine_helpers import make_engine, run_all, twelve_requests

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


def test_token_sizes_end_at_the_budget():
    assert token_sizes(64) == [64]
    assert token_sizes(90) == [64, 90]
    assert token_sizes(4096) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    sizes = token_sizes(16384)
    assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:]))   # padding wastes under a third of a step


def test_padded_mixed_step_equals_eager_with_portable_attention(model_path):
    assert graph_step_cases.check_mixed_step(str(model_path), "torch", torch.float32, "cpu",
                                             graph_step_cases.EagerCapture()) == 1


@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_padded_mixed_step_equals_eager_in_triton_interpreter(model_path):
    """The CUDA backend's kernels (varlen prefill over the padded batch, paged decode of the output rows) on CPU
    tensors; a process of its own, as TRITON_INTERPRET is read when the kernels are defined."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "graph_step_cases.py", str(model_path)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=HERE)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def with_graphs(engine, max_graph_batch):
    """Replace the engine's runner by one whose decode and mixed steps run in EagerCapture graphs; count replays."""
    r = engine.runner
    engine.runner = ModelRunner(engine.model, r.backend, r.num_blocks, r.block_size, r.device, r.dtype,
                                graph_capture=graph_step_cases.EagerCapture(), max_graph_batch=max_graph_batch,
                                max_blocks_per_seq=-(-engine.max_model_len // engine.block_size),
                                max_graph_tokens=engine.config.max_num_batched_tokens,
                                eos_token_ids=r.eos_token_ids)
    replays = {"decode": 0, "mixed": 0}
    for kind, graphs in (("decode", engine.runner.graphs), ("mixed", engine.runner.mixed_graphs)):
        for captured in graphs.graphs.values():
            replay = captured.replay
            captured.replay = lambda kind=kind, replay=replay: (replays.__setitem__(kind, replays[kind] + 1),
                                                                replay())
    return replays


def test_engine_with_every_step_in_graphs_gives_the_eager_outputs(model_path, test_images):
    reqs = twelve_requests(test_images)
    # rows the sampler takes from the graph's logits: drawn, with logprobs, with EOS banned by min_tokens
    reqs += [(1, "drawn", "Tell me a story.", [test_images[0]], SamplingParams(max_tokens=9, temperature=0.8, seed=3)),
             (2, "logprobs", "What is a rabbit?", [], SamplingParams(max_tokens=5, logprobs=2)),
             (2, "min-tokens", "Hi", [], SamplingParams(max_tokens=6, min_tokens=6))]
    eager = run_all(make_engine(model_path, max_model_len=256, max_num_seqs=8), reqs)
    engine = make_engine(model_path, max_model_len=256, max_num_seqs=8)
    replays = with_graphs(engine, 8)
    execute = engine.runner.execute
    engine.runner.execute = lambda step: replays.__setitem__("eager", replays.get("eager", 0) + 1) or execute(step)
    assert run_all(engine, reqs) == eager
    assert replays["mixed"] >= 8 and replays["decode"] > 10 and "eager" not in replays, replays
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_padded_mixed_step_equals_eager_on_gpu(checkpoint_factory, dtype):
    from bunny_backend.engine.worker.graph_capture import GraphCapture
    path = checkpoint_factory(seed=5, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
    graph_step_cases.check_mixed_step(str(path), "cuda", dtype, "cuda", GraphCapture(), scale=6, max_tokens=1024,
                                      max_seqs=32)
