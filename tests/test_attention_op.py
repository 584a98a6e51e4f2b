"""Op level: paged attention (portable backend) against dense causal attention, random non-contiguous blocks."""
import math

import pytest
import torch

from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.utils.context import ForwardContext


def dense_attention(q, k, v, num_prefix):
    """q [Lq, H, D] at positions num_prefix.., k/v [Lk, Hkv, D]; causal; explicit head repeat."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    qpos = torch.arange(q.shape[0]).unsqueeze(1) + num_prefix
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_tables(lengths, block_size, num_blocks, gen):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // block_size)
        tables.append([perm.pop() for _ in range(need)])
    width = max(map(len, tables))
    return tables, torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)


def slots_of(table, start, end, block_size):
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


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
