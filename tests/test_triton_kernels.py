"""The Triton-lang kernels of the CUDA path (varlen prefill, paged decode whole and split, the fused decoder ops)
against their oracles (kernel_cases.py): in Triton's CPU interpreter on every run (small shapes, float16), and on a
GPU (`pytest -m gpu`, larger shapes, bfloat16 and float16). Their launch plans are checked everywhere, and the CPU
runtime is checked never to import triton."""
import os
import subprocess
import sys

import pytest
import torch

import kernel_cases
from bunny_backend.ops import triton_paged_decode as tpd
from bunny_backend.ops import triton_prefill, triton_tuning
from bunny_backend.ops.triton_support import triton

HERE = os.path.dirname(__file__)
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prefill_inputs(heads, kv_heads, head_dim, lens_q, lens_k, block_size=16):
    tables = torch.zeros(len(lens_q), 8, dtype=torch.int32)
    cu = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cache = torch.zeros(20, block_size, kv_heads, head_dim, dtype=torch.float16)
    return dict(q=torch.zeros(sum(lens_q), heads, head_dim, dtype=torch.float16), k_cache=cache, v_cache=cache.clone(),
                block_tables=tables, cu_seqlens_q=cu, seqlens_k=torch.tensor(lens_k, dtype=torch.int32))


# ---- everywhere ----------------------------------------------------------------------------------------------
def test_prefill_tiles_cover_every_sequence_without_host_lengths():
    """Sequence s's tiles start at cu_q[s] // BLOCK_Q + s: they never overlap the next sequence's, and the grid
    (N // BLOCK_Q + B) reaches the last sequence's last tile."""
    for heads, kv_heads, lens_q in [(4, 4, [1, 64, 65, 3, 200]), (14, 2, [7, 1, 33]), (16, 1, [5, 5])]:
        cfg = triton_prefill.launch_config(**_prefill_inputs(heads, kv_heads, 64, lens_q, lens_q))
        block_q = cfg.block_q
        assert block_q * cfg.group >= 16 and cfg.group >= heads // kv_heads
        starts, ends = [], []
        offset = 0
        for s, n in enumerate(lens_q):
            starts.append(offset // block_q + s)
            ends.append(starts[-1] + -(-n // block_q))
            offset += n
        assert all(e <= s for e, s in zip(ends, starts[1:])) and ends[-1] <= cfg.grid[0]
        assert cfg.grid == (sum(lens_q) // block_q + len(lens_q), kv_heads)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "int32"),
    (lambda a: a.update(seqlens_k=a["seqlens_k"][:1]), r"cu_seqlens_q \[2\]"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(1, 2)), "caches"),
    (lambda a: a.update(q=a["q"][:, :3]), "heads"),
])
def test_prefill_launch_config_refuses_bad_inputs(change, message):
    inp = _prefill_inputs(4, 2, 32, [5, 30], [9, 30])
    change(inp)
    with pytest.raises(ValueError, match=message):
        triton_prefill.launch_config(**inp)


def test_launch_shapes_come_from_the_head_size_table_or_the_caller():
    from bunny_backend.ops.triton_tuning import DECODE, PREFILL, DecodeTuning, PrefillTuning
    assert [triton_tuning.prefill_tuning(d) for d in (16, 64, 96, 128, 512)] == \
        [PREFILL[64], PREFILL[64], PREFILL[128], PREFILL[128], PREFILL[256]]
    assert [triton_tuning.decode_tuning(d) for d in (64, 128, 256, 512)] == [DECODE[128], DECODE[128], DECODE[256],
                                                                            DECODE[256]]
    inp = _prefill_inputs(14, 2, 64, [5, 30], [9, 30])   # GQA 7: 8 score rows per query token
    cfg = triton_prefill.launch_config(**inp, tuning=PrefillTuning(32, 16, 2, 1))
    assert (cfg.block_q, cfg.block_n, cfg.num_warps, cfg.num_stages) == (4, 16, 2, 1) and cfg.grid == (35 // 4 + 2, 2)
    default = triton_prefill.launch_config(**inp)
    assert (default.block_q * default.group, default.block_n) == (PREFILL[64].block_m, PREFILL[64].block_n)
    q, cache = torch.zeros(2, 14, 64, dtype=torch.float16), torch.zeros(9, 16, 2, 64, dtype=torch.float16)
    dec = dict(q=q, k_cache=cache, v_cache=cache, block_tables=torch.zeros(2, 3, dtype=torch.int32),
               context_lens=torch.ones(2, dtype=torch.int32))
    cfg = tpd.launch_config(**dec, tuning=DecodeTuning(128, 8, 2))
    assert (cfg.blocks_per_tile, cfg.num_warps, cfg.num_stages) == (8, 8, 2)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        triton_prefill.launch_config(**inp, tuning=PrefillTuning(48, 16, 2, 1))
    with pytest.raises(ValueError, match="powers of two >= 16"):
        tpd.launch_config(**dec, tuning=DecodeTuning(64, 0, 2))


def test_decode_splits_fill_the_sms_only_when_the_batch_does_not():
    assert tpd.split_count(batch=64, kv_heads=16, num_sms=132) == 1
    assert tpd.split_count(batch=1, kv_heads=16, num_sms=132) == 9          # 144 programs >= 132
    assert tpd.split_count(batch=1, kv_heads=2, num_sms=132) == tpd.MAX_SPLITS
    assert tpd.split_count(batch=8, kv_heads=2, num_sms=132) == 9           # 16 x 9 = 144
    for batch in range(1, 300):
        s = tpd.split_count(batch, 2, 132)
        assert 1 <= s <= tpd.MAX_SPLITS and (s == tpd.MAX_SPLITS or batch * 2 * s >= 132)


def test_cpu_runtime_never_imports_the_triton_kernels(tiny_checkpoint):
    """A CPU engine loads, prefills and decodes without importing our Triton modules, so it needs no triton (torch
    itself imports an installed triton when torch._dynamo loads, which a CPU engine's weight init does)."""
    code = ("import sys; from bunny_backend.config import EngineConfig; "
            "from bunny_backend.engine.llm_engine import LLMEngine; "
            "from bunny_backend.engine.sampling_params import SamplingParams\n"
            f"e = LLMEngine(EngineConfig(model_path={str(tiny_checkpoint)!r}, device='cpu'))\n"
            "e.add_request('a', 'hello there', [], SamplingParams(max_tokens=3))\n"
            "while e.has_unfinished(): e.step()\n"
            "ours = [m for m in sys.modules if m.startswith('bunny_backend.ops.triton')]\n"
            "assert not ours, ours\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@needs_triton
def test_kernels_in_triton_interpreter():
    """Every kernel on its small cases in Triton's CPU interpreter (a process of its own: TRITON_INTERPRET is read
    when the kernels are defined)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "kernel_cases.py"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=HERE)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]


# ---- on a CUDA device ----------------------------------------------------------------------------------------
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@pytest.mark.parametrize("case", kernel_cases.LARGE["decode"], ids=lambda c: str(c[0]))
@DTYPES
@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_decode_on_gpu(case, dtype):
    kernel_cases.check_decode(*case, dtype, "cuda")


@pytest.mark.parametrize("case", kernel_cases.LARGE["prefill"], ids=lambda c: str(c[0]))
@DTYPES
@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_prefill_on_gpu(case, dtype):
    kernel_cases.check_prefill(*case, dtype, "cuda")


@pytest.mark.parametrize("case", kernel_cases.LARGE["tuned_decode"] + kernel_cases.LARGE["tuned_prefill"],
                         ids=lambda c: f"{c[0]}-{c[2]}")
@DTYPES
@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_other_launch_shapes_on_gpu(case, dtype):
    check = kernel_cases.check_tuned_decode if isinstance(case[2], triton_tuning.DecodeTuning) \
        else kernel_cases.check_tuned_prefill
    check(*case, dtype, "cuda")


@pytest.mark.parametrize("shape", kernel_cases.LARGE["mixed"], ids=str)
@DTYPES
@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_cuda_backend_mixed_steps_on_gpu(shape, dtype):
    kernel_cases.check_mixed(shape, dtype, "cuda")


@pytest.mark.parametrize("shape", kernel_cases.LARGE["fused"], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_fused_ops_on_gpu(shape, dtype):
    kernel_cases.check_fused(shape, dtype, "cuda")
