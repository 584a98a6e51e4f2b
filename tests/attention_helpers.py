"""Op-level test data: paged caches behind random, non-contiguous block tables, and the dense causal oracle."""
from __future__ import annotations

import math

import torch

from bunny_backend.utils.context import paged_context


# (cached, new) per sequence, decode rows first: the mixed batches every backend is tested on. MIXED_SPANS's
# prefill chunks have and lack a cached prefix, and include a one-token chunk over a cache (a prefix-cache hit of
# all but the last token) and a one-token prompt; MIXED_NO_PREFIX's chunks have none (CUDA's flash-attn path).
MIXED_SPANS = [(37, 1), (5, 1), (120, 1), (0, 23), (48, 17), (16, 1), (0, 1)]
MIXED_NO_PREFIX = [(37, 1), (5, 1), (0, 23), (0, 40)]


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


def paged_step(backend, spans, heads, kv_heads, head_dim, block_size, dtype=torch.float32, device="cpu",
               num_decodes=0, seed=0):
    """One step over a paged cache: sequence i has spans[i] = (cached, new) tokens; the cached K/V is already in
    the cache (random blocks), the new rows' K/V is stored by this step. Returns (q, k, v, k_cache, v_cache, ctx,
    expected) with `expected` the dense oracle's output [sum(new), H, D] in float32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in spans]
    num_blocks = sum(-(-t // block_size) for t in totals) + 4
    tables, _ = make_tables(totals, block_size, num_blocks, gen)
    K = [torch.randn(t, kv_heads, head_dim, generator=gen) for t in totals]
    V = [torch.randn(t, kv_heads, head_dim, generator=gen) for t in totals]
    Q = [torch.randn(n, heads, head_dim, generator=gen) for _, n in spans]
    k_cache, v_cache = backend.allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device)
    cast = lambda t: t.to(dtype=dtype, device=device)   # noqa: E731
    cached = [i for i, (c, _) in enumerate(spans) if c]
    if cached:
        slots = torch.tensor(sum((slots_of(tables[i], 0, spans[i][0], block_size) for i in cached), []), device=device)
        backend.store_kv(cast(torch.cat([K[i][:spans[i][0]] for i in cached])),
                         cast(torch.cat([V[i][:spans[i][0]] for i in cached])), k_cache, v_cache, slots)
    slots = torch.tensor(sum((slots_of(tables[i], c, c + n, block_size) for i, (c, n) in enumerate(spans)), []),
                         device=device)
    ctx = paged_context([n for _, n in spans], totals, tables, slots, num_decodes)
    q = cast(torch.cat(Q))
    k = cast(torch.cat([K[i][c:] for i, (c, _) in enumerate(spans)]))
    v = cast(torch.cat([V[i][c:] for i, (c, _) in enumerate(spans)]))
    backend.store_kv(k, v, k_cache, v_cache, slots)
    rounded = lambda t: t.to(dtype).float()   # noqa: E731  the oracle sees the inputs as the op did
    expected = torch.cat([dense_attention(rounded(Q[i]), rounded(K[i]), rounded(V[i]), c)
                          for i, (c, _) in enumerate(spans)])
    return q, k, v, k_cache, v_cache, ctx, expected
