"""Op level: our CPU causal attention for prompts (ops/csrc/causal_attention.cpp) against a float64 oracle: lengths
across its row and key blocks, grouped kv heads, strided k/v rows (views of the fused qkv projection), a cached
prefix before q's rows, bf16, refusals; and the portable backend's prefill taking it, with and without a cached
prefix. Skips, naming the reason, where it cannot be built."""
import math

import pytest
import torch

from bunny_backend.ops import cpu_kernels
from bunny_backend.ops.attention_torch import TorchAttentionBackend, _cpu_causal_attention
from bunny_backend.utils.context import ForwardContext
from attention_helpers import paged_step
from cpu_kernel_helpers import require_kernel

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, "causal_attention")
    return torch.ops.bunny.causal_attention


def oracle(q, k, v, scale):
    """q's rows are the last of k's: row i at position Lk - L + i."""
    L, H, D = q.shape
    Lk, group = k.shape[0], H // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("ihd,jhd->hij", q.double(), k) * scale
    scores = scores.masked_fill(torch.ones(L, Lk, dtype=torch.bool).triu(Lk - L + 1), -math.inf)
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def qkv_views(L, H, Hkv, D, dtype, seed, prefix=0):
    """q, k, v as the model passes them: q and k contiguous (rotary's outputs), v a view into the fused qkv; with
    a prefix, k and v hold `prefix` more rows before q's (as gathered from the cache)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(prefix + L, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    q = torch.randn(L, H, D, generator=gen).to(dtype)
    k = torch.randn(prefix + L, Hkv, D, generator=gen).to(dtype)
    return q, k, qkv[:, (H + Hkv) * D:].view(prefix + L, Hkv, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 3, 4, 31, 32, 33, 64, 65, 130])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (8, 2, 32), (2, 1, 64), (2, 2, 128)])
def test_matches_the_oracle(kernel, dtype, L, H, Hkv, D):
    q, k, v = qkv_views(L, H, Hkv, D, dtype, seed=L * 100 + D)
    got = kernel(q, k, v, D ** -0.5)
    assert got.dtype == dtype and got.shape == (L, H, D) and got.is_contiguous()
    want = oracle(q, k, v, D ** -0.5)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L,prefix", [(1, 1), (1, 70), (5, 27), (33, 64), (40, 100)])
def test_rows_after_a_cached_prefix_match_the_oracle(kernel, dtype, L, prefix):
    q, k, v = qkv_views(L, 8, 2, 32, dtype, seed=L * 7 + prefix, prefix=prefix)
    got = kernel(q, k, v, 32 ** -0.5)
    assert got.shape == (L, 8, 32)
    want = oracle(q, k, v, 32 ** -0.5)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < TOLERANCE[dtype]


def test_refusals_name_the_problem(kernel):
    q = torch.randn(5, 4, 16)
    with pytest.raises(RuntimeError, match=r"causal_attention: head_dim 24 is not one of 16,32,64,128"):
        kernel(torch.randn(5, 4, 24), torch.randn(5, 4, 24), torch.randn(5, 4, 24), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: 4 query heads are not a multiple of 3 kv heads"):
        kernel(q, torch.randn(5, 3, 16), torch.randn(5, 3, 16), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: k and v must be \[Lk, Hkv, 16\] with Lk >= 5"):
        kernel(q, torch.randn(4, 4, 16), torch.randn(4, 4, 16), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: k and v must be"):
        kernel(q, torch.randn(6, 4, 16), torch.randn(7, 4, 16), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: q, k and v must all be float32 or all bfloat16"):
        kernel(q.half(), q.half(), q.half(), 1.0)
    assert cpu_kernels.causal_attention(24) is None and cpu_kernels.causal_attention(64) is kernel


def test_the_portable_backend_runs_fresh_prompts_on_it(kernel, monkeypatch):
    """Two packed prompts through TorchAttentionBackend.prefill: the kernel is called per prompt, and the result
    is the oracle's."""
    calls = []
    monkeypatch.setattr(cpu_kernels, "causal_attention",
                        lambda head_dim: lambda *a: calls.append(a[0].shape) or kernel(*a))
    q, k, v = qkv_views(7 + 12, 4, 2, 16, torch.float32, seed=3)
    ctx = ForwardContext(is_prefill=True, seqlens_q=[7, 12], seqlens_k=[7, 12])
    out = TorchAttentionBackend().prefill(q, k, v, None, None, ctx, 0.25)
    assert calls == [(7, 4, 16), (12, 4, 16)]
    for s, e in ((0, 7), (7, 19)):
        torch.testing.assert_close(out[s:e].double(), oracle(q[s:e], k[s:e], v[s:e], 0.25), atol=1e-5, rtol=1e-5)


def test_layouts_it_does_not_take_keep_sdpa(kernel):
    q, k, v = qkv_views(9, 4, 4, 16, torch.float32, seed=5)
    assert _cpu_causal_attention(q, k, v) is kernel
    assert _cpu_causal_attention(q, k, torch.randn(9, 16, 4).transpose(1, 2)) is None   # heads not contiguous
    assert _cpu_causal_attention(q.half(), k.half(), v.half()) is None


def test_the_portable_backend_runs_prompts_after_a_cached_prefix_on_it(kernel, monkeypatch):
    """Chunks over cached prefixes (random non-contiguous blocks) and fresh ones in one step: each prompt's rows go
    to the kernel with its whole K/V, and the result is the dense oracle's."""
    calls = []
    monkeypatch.setattr(cpu_kernels, "causal_attention",
                        lambda head_dim: lambda *a: calls.append((a[0].shape[0], a[1].shape[0])) or kernel(*a))
    backend = TorchAttentionBackend()
    spans = [(37, 5), (0, 23), (48, 17), (16, 1)]
    q, k, v, k_cache, v_cache, ctx, expected = paged_step(backend, spans, 8, 2, 32, 16, seed=4)
    out = backend.prefill(q, k, v, k_cache, v_cache, ctx, 32 ** -0.5)
    assert calls == [(n, c + n) for c, n in spans]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
