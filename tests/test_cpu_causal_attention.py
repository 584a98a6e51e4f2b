"""Op level: our CPU causal attention for fresh prompts (ops/csrc/causal_attention.cpp) against a float64 oracle:
lengths across its row and key blocks, grouped kv heads, strided k/v rows (views of the fused qkv projection),
bf16, refusals; and the portable backend's prefill taking it. Skips, naming the reason, where it cannot be built."""
import math

import pytest
import torch

from bunny_backend.ops import cpu_kernels
from bunny_backend.ops.attention_torch import TorchAttentionBackend, _cpu_causal_attention
from bunny_backend.utils.context import ForwardContext
from cpu_kernel_helpers import require_kernel

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, "causal_attention")
    return torch.ops.bunny.causal_attention


def oracle(q, k, v, scale):
    L, H, D = q.shape
    group = H // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("ihd,jhd->hij", q.double(), k) * scale
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def qkv_views(L, H, Hkv, D, dtype, seed):
    """q, k, v as the model passes them: q and k contiguous (rotary's outputs), v a view into the fused qkv."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(L, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    q = torch.randn(L, H, D, generator=gen).to(dtype)
    k = torch.randn(L, Hkv, D, generator=gen).to(dtype)
    return q, k, qkv[:, (H + Hkv) * D:].view(L, Hkv, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 3, 4, 31, 32, 33, 64, 65, 130])
@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (8, 2, 32), (2, 1, 64), (2, 2, 128)])
def test_matches_the_oracle(kernel, dtype, L, H, Hkv, D):
    q, k, v = qkv_views(L, H, Hkv, D, dtype, seed=L * 100 + D)
    got = kernel(q, k, v, D ** -0.5)
    assert got.dtype == dtype and got.shape == (L, H, D) and got.is_contiguous()
    want = oracle(q, k, v, D ** -0.5)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < TOLERANCE[dtype]


def test_refusals_name_the_problem(kernel):
    q = torch.randn(5, 4, 16)
    with pytest.raises(RuntimeError, match=r"causal_attention: head_dim 24 is not one of 16,32,64,128"):
        kernel(torch.randn(5, 4, 24), torch.randn(5, 4, 24), torch.randn(5, 4, 24), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: 4 query heads are not a multiple of 3 kv heads"):
        kernel(q, torch.randn(5, 3, 16), torch.randn(5, 3, 16), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: k and v must be \[5, Hkv, 16\]"):
        kernel(q, torch.randn(6, 4, 16), torch.randn(6, 4, 16), 1.0)
    with pytest.raises(RuntimeError, match=r"causal_attention: q, k and v must all be float32 or all bfloat16"):
        kernel(q.half(), q.half(), q.half(), 1.0)
    assert cpu_kernels.causal_attention(24) is None and cpu_kernels.causal_attention(64) is kernel


def test_the_portable_backend_runs_fresh_prompts_on_it(kernel, monkeypatch):
    """Two packed prompts through TorchAttentionBackend.prefill: the kernel is called per prompt, and the result
    is the oracle's (a prompt with a cached prefix keeps SDPA; the chunked-prefill tests cover it)."""
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
