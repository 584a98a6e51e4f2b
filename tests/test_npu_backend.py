"""The NPU attention backend against the portable one, through the emulated torch_npu ops (no NPU here): op level
on random non-contiguous block tables, the emulator's refusal of calls the real ops would reject, and engine-level
greedy parity. What this proves is that the backend keeps the ops' contract as written in npu_emulator.py; the real
ops are checked against the same contract by `python -m bunny_backend.tools.check_npu_ops` on an NPU machine."""
import sys

import pytest
import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.ops.attention import get_backend
from bunny_backend.ops.attention_npu import causal_mask
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.ops.npu_emulator import NpuOpContractError, install_emulator
from bunny_backend.tools import check_npu_ops
from bunny_backend.tools.check_npu_ops import make_case, run_case
from engine_helpers import QUESTIONS, run_all, twelve_requests


@pytest.fixture
def emulator():
    with install_emulator() as module:
        yield module


# ---- op level -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("prefix", [[0, 0, 0], [0, 37, 130]], ids=["no-prefix", "cached-prefix"])
def test_ops_match_portable_backend(emulator, heads, kv_heads, block_size, prefix):
    case = make_case(heads, kv_heads, 32, block_size, prefix, [3, 1, 150], seed=heads + block_size)
    got = run_case(get_backend("npu"), case, torch.float32, "cpu")
    want = run_case(TorchAttentionBackend(), case, torch.float32, "cpu")
    for part in got:
        torch.testing.assert_close(got[part], want[part], atol=1e-5, rtol=1e-5, msg=part)
    # the mixed step decodes the first sequence and runs the others' chunks, each row as in the separate steps
    torch.testing.assert_close(got["mixed"], torch.cat([got["decode"][:1], got["prefill"][3:]]), atol=1e-6, rtol=1e-6)
    prefill_op = "_npu_flash_attention_qlens" if any(prefix) else "_npu_flash_attention"
    assert emulator.calls[prefill_op] == 2 and emulator.calls["_npu_paged_attention"] == 2   # alone, then mixed
    assert emulator.calls["_npu_reshape_and_cache"] == 3 + bool(any(prefix))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(dtype):
    with install_emulator(allow_float32=False):
        rows = check_npu_ops.check(get_backend("npu"), dtype, torch.device("cpu"), check_npu_ops.CASES[-2:])
    assert rows and all(ok for *_, ok in rows), rows


def test_check_tool_prints_a_passing_table(capsys):
    before = sys.modules.get("torch_npu")
    assert check_npu_ops.main(["--emulate", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.rstrip().endswith("passed, 0 failed")
    assert sys.modules.get("torch_npu") is before


# ---- the contract the emulator enforces ----------------------------------------------------------------------
def _decode_args(kv_heads=2, heads=4, block_size=16, head_dim=32):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(6, block_size, kv_heads, head_dim, generator=gen)
    return dict(query=torch.randn(2, heads, head_dim, generator=gen), key_cache=cache, value_cache=cache.clone(),
                num_kv_heads=kv_heads, num_heads=heads, scale_value=head_dim ** -0.5,
                block_table=torch.tensor([[3, 1], [5, 0]], dtype=torch.int32),
                context_lens=torch.tensor([20, 7], dtype=torch.int32), out=torch.empty(2, heads, head_dim))


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(key_cache=a["key_cache"].transpose(1, 2).contiguous()), "looks like"),
    (lambda a: a.update(block_table=a["block_table"].long()), "block_table must be int32"),
    (lambda a: a.update(block_table=torch.tensor([[3, 1], [5, -1]], dtype=torch.int32)), r"\[0, 6\)"),
    (lambda a: a.update(block_table=a["block_table"][:, :1].contiguous()), "cannot hold"),
    (lambda a: a.update(context_lens=a["context_lens"].long()), "int32"),
    (lambda a: a.update(num_kv_heads=3), "multiple of num_kv_heads"),
    (lambda a: a.update(out=torch.empty(4, 2, 32).transpose(0, 1)), "contiguous"),
    (lambda a: a.update(query=a["query"].half()), "mixed dtypes"),
])
def test_emulator_refuses_what_the_op_would(emulator, change, message):
    args = _decode_args()
    emulator._npu_paged_attention(**args)      # the unchanged call is fine
    change(args)
    with pytest.raises(NpuOpContractError, match=message):
        emulator._npu_paged_attention(**args)


def test_emulator_refuses_bad_cache_writes_and_masks(emulator):
    k = torch.randn(3, 2, 32)
    cache = torch.zeros(4, 16, 2, 32)
    with pytest.raises(NpuOpContractError, match="slot_indices must be int32"):
        emulator._npu_reshape_and_cache(k, k, cache, cache.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(NpuOpContractError, match="block_size must be a multiple of 16"):
        emulator._npu_reshape_and_cache(k, k, torch.zeros(8, 8, 2, 32), torch.zeros(8, 8, 2, 32),
                                        torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(TypeError):              # keyword names are those of the real binding
        emulator._npu_reshape_and_cache(key=k, value=k, key_cache=cache, value_cache=cache, slot_mapping=None)
    q = torch.randn(5, 4, 32, dtype=torch.bfloat16)
    kv = torch.randn(5, 2, 32, dtype=torch.bfloat16)
    args = dict(query=q, key=kv, value=kv, seq_len=torch.tensor([5], dtype=torch.int32), scale_value=0.1,
                num_heads=4, num_kv_heads=2, out=torch.empty_like(q))
    emulator._npu_flash_attention(mask=causal_mask(5, torch.bfloat16, "cpu"), **args)
    with pytest.raises(NpuOpContractError, match="must be 0 or 1"):          # the fp16 convention in a bf16 call
        emulator._npu_flash_attention(mask=causal_mask(5, torch.float16, "cpu").to(torch.bfloat16), **args)
    with pytest.raises(NpuOpContractError, match="upper-triangular"):
        emulator._npu_flash_attention(mask=causal_mask(5, torch.bfloat16, "cpu").T.contiguous(), **args)
    with pytest.raises(NpuOpContractError, match="host"):
        emulator._npu_flash_attention(mask=causal_mask(5, torch.bfloat16, "cpu"),
                                      **{**args, "seq_len": torch.tensor([5], dtype=torch.int32, device="meta")})


def test_float32_refused_unless_allowed():
    args = _decode_args()
    with install_emulator(allow_float32=False) as strict:
        with pytest.raises(NpuOpContractError, match="dtype torch.float32 is not supported"):
            strict._npu_paged_attention(**args)


def test_install_restores_sys_modules():
    before, had_npu = sys.modules.get("torch_npu"), hasattr(torch, "npu")
    handle = install_emulator()
    import torch_npu
    assert torch_npu is handle.module
    handle.uninstall()
    assert sys.modules.get("torch_npu") is before and hasattr(torch, "npu") == had_npu


# ---- engine level ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_path(checkpoint_factory):
    return checkpoint_factory(seed=5, num_kv_heads=2)


def _engine(model_path, backend, block_size):
    return LLMEngine(EngineConfig(model_path=str(model_path), device="cpu", dtype="float32", attention_backend=backend,
                                  block_size=block_size, kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=64))


@pytest.mark.parametrize("block_size", [16, 128])
def test_engine_greedy_matches_portable_backend(model_path, test_images, block_size):
    """Text, image and a staggered batch (chunked prefill and, at block size 16, prefix-cache hits)."""
    params = SamplingParams(max_tokens=12)
    reqs = [(0, "text", QUESTIONS[0], [], params), (0, "image", QUESTIONS[1], [test_images[0]], params),
            (1, "image-again", QUESTIONS[1], [test_images[0]], params)]
    reqs += [r for r in twelve_requests(test_images)[:8]]
    want = run_all(_engine(model_path, "torch", block_size), reqs)
    with install_emulator() as emulator:
        engine = _engine(model_path, "npu", block_size)
        got = run_all(engine, reqs)
    assert engine.runner.backend.name == "npu"
    for rid in want:
        assert got[rid][0] == want[rid][0], rid
        assert got[rid][0], rid
    assert set(emulator.calls) == {"_npu_reshape_and_cache", "_npu_flash_attention", "_npu_flash_attention_qlens",
                                   "_npu_paged_attention"}
    if block_size == 16:
        assert engine.stats().prefix_cache_hit_tokens > 0


def test_one_mask_at_the_largest_size_counted_in_the_kv_plan(model_path, test_images):
    """The NPU backend holds one causal mask of min(max_num_batched_tokens, max_model_len) rows, cuts each step's
    from it, and the KV memory plan leaves room for it."""
    from bunny_backend.engine.worker.kv_cache import bytes_per_block
    from bunny_backend.model.config import BunnyConfig
    text = BunnyConfig.from_pretrained(model_path).text
    per_block = bytes_per_block(text, 16, torch.float32)
    with install_emulator():
        workspace = get_backend("npu", max_query_tokens=64).workspace_bytes(torch.float32)
        assert workspace == (2 * 64 * 64 + 128 * 128) * 4
        engine = LLMEngine(EngineConfig(model_path=str(model_path), device="cpu", dtype="float32",
                                        attention_backend="npu",
                                        block_size=16, max_num_batched_tokens=64,
                                        kv_cache_memory_bytes=workspace + 40 * per_block + per_block // 2))
        assert engine.block_manager.num_blocks == 40
        mask = engine.runner.backend.causal_mask
        assert mask.shape == (64, 64)
        reqs = [(i, f"r{i}", QUESTIONS[i % 6] * (1 + i), [test_images[0]] if i % 2 else [],
                 SamplingParams(max_tokens=4)) for i in range(4)]
        run_all(engine, reqs)       # prefills of many lengths, chunked and not
    assert engine.runner.backend.causal_mask is mask
