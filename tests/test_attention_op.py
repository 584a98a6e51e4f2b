"""Op level: paged attention against dense causal attention, random non-contiguous blocks: the portable backend's
prefill and decode, and every backend (portable, NPU through the emulator, CUDA's CPU fallbacks; the CUDA kernels
in test_gpu.py) on mixed batches of decode rows and prefill chunks."""
import pytest
import torch

from bunny_backend.ops.attention import attend, get_backend
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.ops.npu_emulator import install_emulator
from bunny_backend.utils.context import ForwardContext
from attention_helpers import MIXED_NO_PREFIX, MIXED_SPANS, dense_attention, make_tables, paged_step, slots_of


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_with_prefix_then_decode_matches_dense(heads, kv_heads, block_size):
    gen = torch.Generator().manual_seed(heads * 100 + block_size)
    D, num_blocks = 16, 64
    backend = TorchAttentionBackend()
    k_cache, v_cache = backend.allocate_kv_cache(num_blocks, block_size, kv_heads, D, torch.float32, "cpu")
    total = [5, 23, 40]                   # final context lengths
    prefix = [0, 9, 17]                   # tokens already cached before the prefill chunk
    tables, block_tables = make_tables([t + 1 for t in total], block_size, num_blocks, gen)
    K = [torch.randn(t + 1, kv_heads, D, generator=gen) for t in total]
    V = [torch.randn(t + 1, kv_heads, D, generator=gen) for t in total]
    Q = [torch.randn(t + 1, heads, D, generator=gen) for t in total]
    # the cached prefix, written as an earlier step would have
    for i, p in enumerate(prefix):
        if p:
            backend.store_kv(K[i][:p], V[i][:p], k_cache, v_cache,
                             torch.tensor(slots_of(tables[i], 0, p, block_size)))
    # prefill chunk: positions prefix..total
    q = torch.cat([Q[i][p:t] for i, (p, t) in enumerate(zip(prefix, total))])
    k = torch.cat([K[i][p:t] for i, (p, t) in enumerate(zip(prefix, total))])
    v = torch.cat([V[i][p:t] for i, (p, t) in enumerate(zip(prefix, total))])
    slots = sum((slots_of(tables[i], p, t, block_size) for i, (p, t) in enumerate(zip(prefix, total))), [])
    seqlens_q = [t - p for p, t in zip(prefix, total)]
    ctx = ForwardContext(is_prefill=True, block_tables=block_tables, seqlens_q=seqlens_q, seqlens_k=total,
                         slot_mapping=torch.tensor(slots))
    backend.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    out = backend.prefill(q, k, v, k_cache, v_cache, ctx, D ** -0.5)
    expected = torch.cat([dense_attention(Q[i][p:t], K[i][:t], V[i][:t], p)
                          for i, (p, t) in enumerate(zip(prefix, total))])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # decode one more token per sequence
    dslots = torch.tensor([slots_of(tables[i], t, t + 1, block_size)[0] for i, t in enumerate(total)])
    backend.store_kv(torch.stack([K[i][t] for i, t in enumerate(total)]),
                     torch.stack([V[i][t] for i, t in enumerate(total)]), k_cache, v_cache, dslots)
    dctx = ForwardContext(is_prefill=False, block_tables=block_tables, slot_mapping=dslots,
                          context_lens=torch.tensor([t + 1 for t in total], dtype=torch.int32))
    q_dec = torch.stack([Q[i][t] for i, t in enumerate(total)])
    out = backend.decode(q_dec, k_cache, v_cache, dctx, D ** -0.5)
    expected = torch.stack([dense_attention(Q[i][t:t + 1], K[i], V[i], t)[0] for i, t in enumerate(total)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["torch", "npu", "cuda"])
def backend(request):
    if request.param != "npu":
        yield get_backend(request.param)
        return
    with install_emulator():
        yield get_backend("npu")   # its .ops is the emulator, which counts the calls


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("spans", [MIXED_SPANS, MIXED_NO_PREFIX], ids=["chunks-over-prefixes", "fresh-chunks"])
def test_mixed_step_matches_dense(backend, heads, kv_heads, spans):
    """The engine's form: decodes first, split by attend() into one batched decode and one prefill."""
    num_decodes = next(i for i, (cached, new) in enumerate(spans) if not (cached and new == 1))   # the leading rows
    q, k, v, k_cache, v_cache, ctx, expected = paged_step(backend, spans, heads, kv_heads, 32, 16,
                                                          num_decodes=num_decodes, seed=heads)
    assert ctx.decodes is not None and ctx.prefills is not None
    out = attend(backend, q, k, v, k_cache, v_cache, ctx, 32 ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)
    if backend.name == "npu":
        prefill_op = "_npu_flash_attention_qlens" if spans is MIXED_SPANS else "_npu_flash_attention"
        assert backend.ops.calls["_npu_paged_attention"] == 1 and backend.ops.calls[prefill_op] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_interleaved_mixed_batch_through_prefill_matches_dense(backend, seed):
    """Any order, one varlen call: a decode row is a one-token chunk over its cache."""
    spans = [MIXED_SPANS[i] for i in torch.randperm(len(MIXED_SPANS), generator=torch.Generator().manual_seed(seed))]
    q, k, v, k_cache, v_cache, ctx, expected = paged_step(backend, spans, 8, 2, 32, 16, seed=seed)
    out = backend.prefill(q, k, v, k_cache, v_cache, ctx, 32 ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)


def test_pure_decode_and_no_prefix_prefill_steps_take_their_own_kernels(backend):
    decode = paged_step(backend, [(30, 1), (3, 1)], 4, 2, 32, 16, num_decodes=2)
    assert not decode[5].is_prefill
    torch.testing.assert_close(attend(backend, *decode[:6], 32 ** -0.5).float(), decode[6], atol=1e-5, rtol=1e-5)
    prefill = paged_step(backend, [(0, 30), (0, 3)], 4, 2, 32, 16)
    assert prefill[5].decodes is None
    torch.testing.assert_close(attend(backend, *prefill[:6], 32 ** -0.5).float(), prefill[6], atol=1e-5, rtol=1e-5)
    if backend.name == "npu":
        calls = backend.ops.calls
        assert calls["_npu_paged_attention"] == 1 and calls["_npu_flash_attention"] == 1
        assert calls["_npu_flash_attention_qlens"] == 0
