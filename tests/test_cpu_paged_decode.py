"""Op level: the C++ CPU paged decode kernel (ops/csrc/paged_decode.cpp) against a naive oracle over random,
non-contiguous block tables; the portable backend's decode with and without it; the fallback when it cannot be
built. The kernel-only tests skip, naming the reason, where this machine cannot compile it."""
import logging

import pytest
import torch

from bunny_backend.ops import cpu_kernels
from bunny_backend.ops.attention import attend
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from attention_helpers import MIXED_SPANS, paged_step
from cpu_kernel_helpers import require_kernel

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, "paged_decode")   # the backend tests below mean the kernel
    return torch.ops.bunny.paged_decode


def random_paged_batch(lens, heads, kv_heads, head_dim, block_size, dtype, gen):
    """A cache of random blocks, each sequence's blocks drawn at random; table padding is -1 or a stray block id."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 5
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need) + 1
    tables = []
    for i, n in enumerate(need):
        pad = -1 if i % 2 else perm[-1]   # past the sequence: never read
        tables.append([perm.pop(0) for _ in range(n)] + [pad] * (width - n))
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


def naive_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Per sequence: gather its blocks row by row, repeat kv heads, plain softmax; float64."""
    block_size, out = k_cache.shape[1], []
    for b, n in enumerate(context_lens.tolist()):
        rows = [(block_tables[b, t // block_size].item(), t % block_size) for t in range(n)]
        k = torch.stack([k_cache[blk, off] for blk, off in rows]).double()   # [n, Hkv, D]
        v = torch.stack([v_cache[blk, off] for blk, off in rows]).double()
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        p = (torch.einsum("hd,thd->ht", q[b].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("ht,thd->hd", p, v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa4", "mqa6"])
@pytest.mark.parametrize("lens", [[1], [37], [16, 1, 48, 5, 33, 64, 17]], ids=["b1-len1", "b1", "b7"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_matches_naive_oracle(kernel, dtype, heads, kv_heads, lens, block_size):
    gen = torch.Generator().manual_seed(len(lens) * 1000 + heads * 10 + block_size)
    inputs = random_paged_batch(lens, heads, kv_heads, 32, block_size, dtype, gen)
    scale = 32 ** -0.5
    out = kernel(*inputs, scale)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), naive_decode(*inputs, scale), atol=tol, rtol=tol)


def test_kernel_runs_the_same_on_one_thread_and_many(kernel):
    gen = torch.Generator().manual_seed(7)
    inputs = random_paged_batch([300, 17, 64, 1, 129], 16, 4, 64, 16, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(*inputs, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(kernel(*inputs, 0.125), one, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad,message", [("len0", "context length 0"), ("too_long", "context length 99"),
                                         ("block", "outside the cache")])
def test_kernel_rejects_inconsistent_metadata_by_name(kernel, bad, message):
    q, k_cache, v_cache, tables, lens = random_paged_batch([20, 9], 4, 2, 16, 8, torch.float32,
                                                           torch.Generator().manual_seed(0))
    if bad == "len0":
        lens[1] = 0
    elif bad == "too_long":
        lens[1] = 99
    else:
        tables[0, 1] = k_cache.shape[0]
    with pytest.raises(RuntimeError, match=message):
        kernel(q, k_cache, v_cache, tables, lens, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spans", [[(57, 1)], [(30, 1), (3, 1), (0, 1), (127, 1), (15, 1)]], ids=["b1", "b5"])
def test_backend_decode_with_kernel_equals_portable_path(kernel, dtype, spans):
    backend = TorchAttentionBackend()
    q, _, _, k_cache, v_cache, ctx, expected = paged_step(backend, spans, 8, 2, 64, 16, dtype=dtype,
                                                          num_decodes=len(spans), seed=len(spans))
    out = backend.decode(q, k_cache, v_cache, ctx, 0.125)
    portable = backend.decode_gathered(q, k_cache, v_cache, ctx, 0.125)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), portable.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_mixed_step_decode_rows_take_the_kernel(kernel, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda: lambda *a: calls.append(a) or kernel(*a))
    backend = TorchAttentionBackend()
    q, k, v, k_cache, v_cache, ctx, expected = paged_step(backend, MIXED_SPANS, 8, 2, 32, 16, num_decodes=3)
    torch.testing.assert_close(attend(backend, q, k, v, k_cache, v_cache, ctx, 32 ** -0.5), expected,
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and calls[0][0].shape[0] == 3


def test_env_var_forces_the_portable_path(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert cpu_kernels.paged_decode() is None
    backend = TorchAttentionBackend()
    gathered = []
    monkeypatch.setattr(backend, "decode_gathered",
                        lambda *a: gathered.append(1) or TorchAttentionBackend.decode_gathered(backend, *a))
    q, _, _, k_cache, v_cache, ctx, expected = paged_step(backend, [(40, 1), (9, 1)], 4, 2, 32, 16, num_decodes=2)
    torch.testing.assert_close(backend.decode(q, k_cache, v_cache, ctx, 32 ** -0.5), expected, atol=1e-5, rtol=1e-5)
    assert gathered == [1]


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """cpu_kernels.load as in a new process, its builds going to tmp_path. The real kernel is loaded first (where
    it builds): torch's JIT builder would otherwise rebuild it under a new name after seeing another folder."""
    cpu_kernels.load("paged_decode")
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_kernels, "_REASONS", {})
    monkeypatch.setattr(cpu_kernels, "build_dir", lambda: tmp_path)


@pytest.mark.parametrize("compiler,reason", [("/nonexistent/c++", "no C++ compiler"), ("false", "")],
                         ids=["no-compiler", "compile-fails"])
def test_unbuildable_kernel_falls_back_with_one_warning(fresh_loader, monkeypatch, caplog, compiler, reason):
    monkeypatch.setenv("CXX", compiler)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.paged_decode() is None
        assert cpu_kernels.paged_decode() is None
    warnings = [r for r in caplog.records if r.name == cpu_kernels.__name__]
    assert len(warnings) == 1 and "portable code runs instead" in warnings[0].getMessage()
    assert reason in warnings[0].getMessage()
    backend = TorchAttentionBackend()
    q, _, _, k_cache, v_cache, ctx, expected = paged_step(backend, [(40, 1), (9, 1)], 8, 2, 32, 16, num_decodes=2)
    torch.testing.assert_close(backend.decode(q, k_cache, v_cache, ctx, 32 ** -0.5), expected, atol=1e-5, rtol=1e-5)
