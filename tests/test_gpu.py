"""The CUDA attention backend and the model on CUDA. Tests marked `gpu` need a CUDA device and are skipped
elsewhere; the launch configuration of the Triton decode kernel and the CPU fallbacks are checked everywhere. The
kernels themselves run in Triton's CPU interpreter in test_triton_kernels.py."""
import pytest
import torch

from bunny_backend.ops import triton_paged_decode as tpd
from bunny_backend.ops.triton_tuning import decode_tuning
from bunny_backend.ops.attention import attend, get_backend
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.tools.check_npu_ops import make_case, run_case
from bunny_backend.utils.context import ForwardContext
from attention_helpers import MIXED_NO_PREFIX, MIXED_SPANS, paged_step
from model_helpers import BF16_REL_ERR, TOP1_AGREEMENT, agreement

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(tpd.triton is None, reason="triton is not installed")


def decode_inputs(heads, kv_heads, head_dim, block_size, lens, dtype, device, seed=0):
    """Random caches and a -1 padded block table of random, non-contiguous blocks."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(map(len, tables))
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
    return dict(q=rand(len(lens), heads, head_dim), k_cache=rand(num_blocks, block_size, kv_heads, head_dim),
                v_cache=rand(num_blocks, block_size, kv_heads, head_dim),
                block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32,
                                          device=device),
                context_lens=torch.tensor(lens, dtype=torch.int32, device=device))


def portable_decode(inp, scale):
    ctx = ForwardContext(is_prefill=False, block_tables=inp["block_tables"], context_lens=inp["context_lens"])
    return TorchAttentionBackend().decode(inp["q"].float(), inp["k_cache"].float(), inp["v_cache"].float(), ctx,
                                          scale)


# ---- everywhere ----------------------------------------------------------------------------------------------
def test_launch_config_pads_the_query_group_and_takes_strides():
    inp = decode_inputs(14, 2, 64, 16, [1, 40, 17], torch.float16, "cpu")
    cfg = tpd.launch_config(**inp)
    assert cfg.grid == (3, 2, 1) and cfg.queries_per_kv == 7 and cfg.group == 16
    assert cfg.q_strides == (14 * 64, 64) and cfg.cache_strides == (16 * 2 * 64, 2 * 64, 64)
    assert cfg.table_stride == inp["block_tables"].shape[1]
    assert cfg.blocks_per_tile == decode_tuning(64).tile_tokens // 16 > 1   # several blocks per loop iteration
    assert tpd.launch_config(**decode_inputs(64, 2, 64, 16, [3], torch.float16, "cpu")).group == 32
    assert tpd.launch_config(**decode_inputs(4, 4, 64, 16, [3], torch.float16, "cpu")).group == 1   # MHA: a vector
    assert tpd.launch_config(**inp, num_splits=5).grid == (3, 2, 5)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(block_tables=a["block_tables"].long()), "int32"),
    (lambda a: a.update(context_lens=a["context_lens"].long()), "int32"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2)), "caches"),
    (lambda a: a.update(q=a["q"][:, :3]), "heads"),
    (lambda a: a.update(block_tables=a["block_tables"][:1]), r"\[2, M\]"),
])
def test_launch_config_refuses_bad_inputs(change, message):
    inp = decode_inputs(4, 2, 32, 16, [5, 30], torch.float16, "cpu")
    change(inp)
    with pytest.raises(ValueError, match=message):
        tpd.launch_config(**inp)


def test_unsupported_shapes_and_dtypes_fall_back():
    q, cache = torch.zeros(1, 4, 32, dtype=torch.float16), torch.zeros(2, 16, 2, 32, dtype=torch.float16)
    if tpd.triton is None:
        assert "triton" in tpd.unsupported_reason(q, cache)
    else:
        assert tpd.unsupported_reason(q, cache) is None
        assert "dtype" in tpd.unsupported_reason(q.float(), cache.float())
        assert "powers of two" in tpd.unsupported_reason(q[..., :24], cache[..., :24])


# ---- on a CUDA device ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(16, 16, 128, 16), (14, 2, 64, 16),
                                                                (12, 2, 128, 32), (7, 1, 64, 16)])
def test_triton_decode_matches_portable(dtype, heads, kv_heads, head_dim, block_size):
    inp = decode_inputs(heads, kv_heads, head_dim, block_size, [1, 17, 300, 1000], dtype, "cuda", seed=heads)
    out = tpd.paged_decode(**inp, scale=head_dim ** -0.5)
    torch.testing.assert_close(out.float(), portable_decode(inp, head_dim ** -0.5), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("prefix", [[0, 0, 0], [0, 40, 300]], ids=["no-prefix", "cached-prefix"])
def test_cuda_backend_matches_portable_bf16(prefix):
    case = make_case(14, 2, 64, 16, prefix, [9, 1, 200], seed=1)
    got = run_case(get_backend("cuda"), case, torch.bfloat16, "cuda")
    want = run_case(TorchAttentionBackend(), case.to(torch.bfloat16, "cpu"), torch.float32, "cpu")
    for part in got:
        torch.testing.assert_close(got[part], want[part], atol=2e-2, rtol=2e-2, msg=part)


# bf16 against fp32: teacher-forced logits within model_helpers' bf16 tolerance; a graph against eager: identical.
# The figures are printed (pytest -s) for the GPU session's notes.


def _load(path, device, dtype):
    from bunny_backend.model.loader import load_model
    return load_model(str(path), dtype, torch.device(device))


@pytest.mark.gpu
@needs_cuda
def test_bf16_cuda_logits_track_cpu_fp32(checkpoint_factory, test_images):
    """Teacher-forced: the fp32 CPU model's greedy continuations, scored at every position by both models."""
    from bunny_backend.io.tokenizer import load_tokenizer
    from engine_helpers import QUESTIONS
    from model_helpers import teacher_forced

    path = checkpoint_factory(seed=5, num_kv_heads=2)
    ref, gpu = _load(path, "cpu", torch.float32), _load(path, "cuda", torch.bfloat16)
    tok = load_tokenizer(str(path))
    images = [test_images[i] if i % 2 else None for i in range(4)]
    got, want = teacher_forced(ref, gpu, tok, QUESTIONS[:4], images, device="cuda")
    rel, top1 = agreement(got, want)
    print(f"\nbf16 cuda vs fp32 cpu, teacher-forced over {len(want)} positions: "
          f"rel err {rel:.2e}, top-1 agreement {top1:.3f}")
    assert rel < BF16_REL_ERR and top1 >= TOP1_AGREEMENT


def _capture_logits(runner):
    """Make runner record the logits it samples from (eager) or takes a graph's tokens from; returns the list they go
    to."""
    seen = []
    sample, choose = runner._sample, runner._choose

    def recording(logits, seqs, want):
        seen.append(logits.float().cpu())
        return sample(logits, seqs, want)

    def recording_graph(logits, tokens, seqs, want):
        seen.append(logits[want].float().cpu())
        return choose(logits, tokens, seqs, want)

    runner._sample, runner._choose = recording, recording_graph
    return seen


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_cuda_graph_decode_matches_eager_decode(checkpoint_factory, test_images):
    """Every decode step of a mixed batch (text and image requests, staggered, batch sizes that pad) runs twice on
    the same inputs, replayed from a graph and eagerly: the logits are identical, as docs/backends.md states
    (measured on an H200: 36 steps, batch sizes 1-12). Then the run through the graphs gives exactly the tokens of
    an engine that never captures a graph."""
    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.llm_engine import LLMEngine
    from engine_helpers import run_all, twelve_requests

    path = str(checkpoint_factory(seed=5, num_kv_heads=2))
    kw = dict(model_path=path, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=8 << 20,
              max_num_batched_tokens=64)
    engine = LLMEngine(EngineConfig(cuda_graphs=True, **kw))
    runner = engine.runner
    assert runner.graphs is not None and runner.backend.name == "cuda"
    # Mixed steps eager, as in the engine compared with at the end: the mixed-step graphs' attention is another
    # kernel than the eager split (test_mixed_graphs.py compares them within bf16's tolerance).
    runner.mixed_graphs = None
    seen = _capture_logits(runner)
    graphs, run = runner.graphs, runner.run
    pairs, batch_sizes = [], set()

    def twice(step):
        if step.num_decodes < len(step.seqs):   # graphs replay decode-only steps
            return run(step)
        runner.graphs = None
        run(step)          # eager: writes this step's K/V, which the replay rewrites
        runner.graphs = graphs
        tokens = run(step)
        pairs.append((seen[-1], seen[-2]))
        batch_sizes.add(len(step.seqs))
        return tokens

    runner.run = twice
    results = run_all(engine, twelve_requests(test_images))
    differing = [i for i, (g, e) in enumerate(pairs) if not torch.equal(g, e)]
    print(f"\ncuda graphs vs eager over {len(pairs)} decode steps (batch sizes {sorted(batch_sizes)}): "
          f"{len(differing)} steps differ")
    assert len(batch_sizes) > 3 and pairs and differing == [], \
        f"graph replay differs from eager at decode steps {differing[:10]} of {len(pairs)}"
    eager = run_all(LLMEngine(EngineConfig(cuda_graphs=False, **kw)), twelve_requests(test_images))
    assert results == eager
    for i, (ids, _, reason) in enumerate(results.values()):
        assert reason in ("stop", "length") and ids, i


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_tensor_parallel_greedy_equals_one_gpu(checkpoint_factory, test_images):
    """Two ranks on two GPUs (nccl), fp32 so that only the reduction order differs: the same greedy tokens as one
    GPU, text and image, with a replicated KV head and an odd vocabulary."""
    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.llm_engine import LLMEngine
    from engine_helpers import run_all, twelve_requests

    path = str(checkpoint_factory(seed=22, num_heads=4, num_kv_heads=1, vocab_size=1537))
    kw = dict(model_path=path, device="cuda", dtype="float32", kv_cache_memory_bytes=8 << 20,
              max_num_batched_tokens=64)
    reqs = twelve_requests(test_images)[:6]
    one = run_all(LLMEngine(EngineConfig(**kw)), reqs)
    engine = LLMEngine(EngineConfig(tensor_parallel_size=2, **kw))
    try:
        assert engine.runner.backend.name == "cuda" and engine.workers is not None
        assert run_all(engine, reqs) == one
    finally:
        engine.shutdown()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("spans", [MIXED_SPANS, MIXED_NO_PREFIX], ids=["chunks-over-prefixes", "fresh-chunks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mixed_step_matches_dense(spans, dtype):
    """Decode rows through the Triton kernel, prefill chunks through flash-attn (fresh chunks, where installed)
    or SDPA; and the whole batch through prefill alone."""
    backend = get_backend("cuda")
    num_decodes = next(i for i, (cached, new) in enumerate(spans) if not (cached and new == 1))
    for nd in (num_decodes, 0):
        q, k, v, k_cache, v_cache, ctx, expected = paged_step(backend, spans, 14, 2, 64, 16, dtype, "cuda",
                                                              num_decodes=nd, seed=nd)
        out = attend(backend, q, k, v, k_cache, v_cache, ctx, 64 ** -0.5)
        torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=2e-2, msg=f"num_decodes={nd}")
