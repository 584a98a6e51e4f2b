"""The CUDA attention backend. Tests marked `gpu` need a CUDA device and are skipped elsewhere; the launch
configuration of the Triton decode kernel and the CPU fallbacks are checked everywhere, and the kernel itself runs
in Triton's CPU interpreter where triton is installed (float16 only: the interpreter's bfloat16 dot is wrong)."""
import os
import subprocess
import sys

import pytest
import torch

from bunny_backend.engine.context import ForwardContext
from bunny_backend.ops import triton_paged_decode as tpd
from bunny_backend.ops.attention import get_backend
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.tools.check_npu_ops import make_case, run_case

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
    assert cfg.grid == (3, 2) and cfg.queries_per_kv == 7 and cfg.group == 16
    assert cfg.q_strides == (14 * 64, 64) and cfg.cache_strides == (16 * 2 * 64, 2 * 64, 64)
    assert cfg.table_stride == inp["block_tables"].shape[1]
    assert tpd.launch_config(**decode_inputs(64, 2, 64, 16, [3], torch.float16, "cpu")).group == 32


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


def test_cuda_backend_on_cpu_float32_is_the_portable_one():
    """Its fallbacks (float32: no flash-attn, no Triton) give the portable results, prefix and decode included."""
    case = make_case(8, 2, 32, 16, [0, 21], [5, 40], seed=3)
    got = run_case(get_backend("cuda"), case, torch.float32, "cpu")
    want = run_case(TorchAttentionBackend(), case, torch.float32, "cpu")
    for part in got:
        torch.testing.assert_close(got[part], want[part], msg=part)


@needs_triton
def test_kernel_in_triton_interpreter():
    code = ("import torch; from test_gpu import decode_inputs, portable_decode; "
            "from bunny_backend.ops import triton_paged_decode as tpd\n"
            "for h, kv, d, bs in [(4, 4, 32, 16), (14, 2, 64, 32), (7, 1, 16, 16)]:\n"
            "    inp = decode_inputs(h, kv, d, bs, [1, bs, bs + 3, 5 * bs - 1], torch.float16, 'cpu', seed=h)\n"
            "    out = tpd.paged_decode(**inp, scale=d ** -0.5)\n"
            "    torch.testing.assert_close(out.float(), portable_decode(inp, d ** -0.5), atol=2e-3, rtol=2e-3)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stderr[-3000:]


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


@pytest.mark.gpu
@needs_cuda
def test_engine_bf16_greedy_matches_cpu_fp32(checkpoint_factory, test_images):
    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.llm_engine import LLMEngine
    from bunny_backend.engine.sampling_params import SamplingParams
    from engine_helpers import QUESTIONS, run_all

    path = str(checkpoint_factory(seed=5, num_kv_heads=2))
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    reqs = [(i // 2, f"r{i}", QUESTIONS[i], [test_images[i % 4]] if i % 2 else [], params) for i in range(6)]
    results = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        engine = LLMEngine(EngineConfig(model_path=path, device=device, dtype=dtype, kv_cache_memory_bytes=8 << 20,
                                        max_num_batched_tokens=64))
        results[device] = run_all(engine, reqs)
    assert engine.runner.backend.name == "cuda"
    for rid in results["cpu"]:
        assert results["cuda"][rid][0] == results["cpu"][rid][0], rid


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_cuda_graph_decode_gives_the_eager_tokens(checkpoint_factory, test_images):
    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.llm_engine import LLMEngine
    from engine_helpers import run_all, twelve_requests

    path = str(checkpoint_factory(seed=5, num_kv_heads=2))
    reqs = twelve_requests(test_images)
    results = {}
    for graphs in (False, True):
        engine = LLMEngine(EngineConfig(model_path=path, device="cuda", dtype="bfloat16", cuda_graphs=graphs,
                                        kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=64))
        assert (engine.runner.graphs is not None) == graphs
        results[graphs] = run_all(engine, reqs)
    assert results[True] == results[False]
