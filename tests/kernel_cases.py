"""The Triton kernels' cases, each against an oracle that shares no code with the kernel: the paged decode (whole
and split context) against a float64 loop over each sequence's blocks; the varlen prefill and the CUDA backend's
mixed steps against attention_helpers' dense causal attention; the fused decoder ops against the model's PyTorch
code (model/layers.py, F.silu) and a float64 formula.

`SMALL` is what Triton's CPU interpreter runs (TRITON_INTERPRET=1, `python kernel_cases.py`, from
test_triton_kernels.py: the interpreter is slow and its bfloat16 dot is wrong, so float16 and tiny shapes);
`LARGE` is what a GPU runs (`pytest -m gpu tests/test_triton_kernels.py`), in bfloat16 and float16.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from attention_helpers import MIXED_SPANS, dense_attention, make_tables, paged_step
from bunny_backend.ops.attention_torch import TorchAttentionBackend
from bunny_backend.ops.triton_tuning import DecodeTuning, PrefillTuning

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
# The fused ops round as PyTorch does: within one unit in the last place of the dtype of PyTorch's own result.
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}

# (heads, kv_heads, head_dim, block_size): MHA and GQA (rep 2, 3 padded to 4, 7 padded to 8 or 16), head dims 64
# and 128 (the kernels' targets) and smaller ones where the interpreter needs speed.
SMALL = dict(
    decode=[((4, 4, 32, 16), [1, 16, 19, 79, 64, 65, 199], (1, 3, 16)),
            ((14, 2, 64, 32), [1, 32, 35, 159, 64, 65, 199], (1, 5)),
            ((6, 2, 128, 16), [1, 100, 17], (1, 2)),
            ((8, 2, 32, 128), [1, 128, 131, 300], (1, 4))],
    # (cached, new) per sequence: fresh prompts, continuing chunks, prefixes ending mid-block, one-token queries,
    # a chunk longer than one query tile over a prefix longer than one key tile
    prefill=[((4, 4, 64, 16), [(0, 23), (37, 9), (5, 1), (16, 1), (0, 1), (70, 70)]),
             ((8, 2, 128, 16), [(0, 40), (48, 17), (5, 1)]),
             ((12, 4, 32, 32), [(33, 30), (0, 7)]),
             ((14, 2, 64, 16), [(3, 12), (0, 5)])],
    mixed=[(14, 2, 64, 16), (4, 4, 64, 16)],
    fused=[(4, 2, 64, 3), (14, 2, 16, 5)],   # (heads, kv_heads, head_dim, rows)
    # launch shapes other than the table's (what bench/tune_kernels.py sweeps): (shape, lens or spans, tuning)
    tuned_decode=[((14, 2, 64, 16), [1, 40, 100], DecodeTuning(tile_tokens=32, num_warps=2, num_stages=1)),
                  ((4, 4, 32, 16), [17, 130], DecodeTuning(tile_tokens=128, num_warps=8, num_stages=2))],
    tuned_prefill=[((4, 4, 64, 16), [(0, 23), (37, 9), (5, 1)], PrefillTuning(32, 32, 2, 1)),
                   ((8, 2, 32, 16), [(21, 40), (0, 3)], PrefillTuning(128, 16, 8, 4))],
)
LARGE = dict(
    decode=[((16, 16, 128, 16), [1, 17, 300, 1000, 4097], (1, 2, 8, 16)),
            ((14, 2, 64, 16), [1, 17, 300, 1000], (1, 3, 16)),
            ((12, 2, 128, 32), [5, 700, 2048], (1, 4)),
            ((7, 1, 64, 16), [33, 999], (1, 7))],
    prefill=[((16, 16, 128, 16), [(0, 1000), (333, 517), (2047, 1), (4000, 300), (16, 16), (0, 1)]),
             ((14, 2, 64, 16), [(0, 700), (31, 200), (129, 1), (1500, 63)]),
             ((12, 2, 128, 32), [(45, 455), (0, 129)]),
             ((7, 1, 64, 16), [(100, 1), (0, 257)])],
    mixed=[(14, 2, 64, 16), (16, 16, 128, 16), (12, 2, 128, 32)],
    fused=[(16, 16, 128, 300), (14, 2, 64, 77), (12, 2, 128, 1)],
    tuned_decode=[((16, 16, 128, 16), [1, 300, 1000], DecodeTuning(32, 2, 1)),
                  ((14, 2, 64, 16), [17, 999], DecodeTuning(128, 8, 4))],
    tuned_prefill=[((16, 16, 128, 16), [(0, 1000), (333, 517), (2047, 1)], PrefillTuning(128, 32, 8, 3)),
                   ((14, 2, 64, 16), [(31, 200), (0, 700)], PrefillTuning(32, 128, 2, 1))],
)


def naive_decode(q, k_cache, v_cache, tables, lens, scale):
    """float64, one sequence and one head at a time, blocks looked up one token at a time."""
    out = torch.empty(q.shape, dtype=torch.float64)
    block_size, rep = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for b, n in enumerate(lens):
        rows = [(tables[b][t // block_size], t % block_size) for t in range(n)]
        k = torch.stack([k_cache[blk, off] for blk, off in rows]).double().cpu()
        v = torch.stack([v_cache[blk, off] for blk, off in rows]).double().cpu()
        for h in range(q.shape[1]):
            p = torch.softmax(k[:, h // rep] @ q[b, h].double().cpu() * scale, 0)
            out[b, h] = p @ v[:, h // rep]
    return out


def check_decode(shape, lens, splits, dtype, device, seed=0, tuning=None):
    from bunny_backend.ops import triton_paged_decode as tpd
    heads, kv_heads, head_dim, block_size = shape
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 5
    tables, table_tensor = make_tables(lens, block_size, num_blocks, gen)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype=dtype, device=device)   # noqa: E731
    q = rand(len(lens), heads, head_dim)
    k_cache, v_cache = (rand(num_blocks, block_size, kv_heads, head_dim) for _ in range(2))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    want = naive_decode(q, k_cache, v_cache, tables, lens, head_dim ** -0.5).float()
    for s in splits:
        got = tpd.paged_decode(q, k_cache, v_cache, table_tensor.to(device), lens_t, head_dim ** -0.5, num_splits=s,
                               tuning=tuning)
        close(got, want, TOLERANCE[dtype], f"decode {shape} splits={s} {tuning or ''}")


def check_prefill(shape, spans, dtype, device, seed=0, tuning=None):
    from bunny_backend.ops import triton_prefill
    heads, kv_heads, head_dim, block_size = shape
    q, _, _, k_cache, v_cache, ctx, want = paged_step(TorchAttentionBackend(), spans, heads, kv_heads, head_dim,
                                                      block_size, dtype, device, seed=seed)
    got = triton_prefill.paged_prefill(q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.context_lens,
                                       head_dim ** -0.5, tuning=tuning)
    close(got, want, TOLERANCE[dtype], f"prefill {shape} {spans} {tuning or ''}")


def check_mixed(shape, dtype, device, seed=0):
    """The CUDA backend through ops.attention.attend: a mixed step split into decode and prefill, and the whole
    batch through prefill (decode rows as one-token queries over their cache)."""
    from bunny_backend.ops.attention import attend, get_backend
    backend = get_backend("cuda")
    num_decodes = next(i for i, (cached, new) in enumerate(MIXED_SPANS) if not (cached and new == 1))
    for nd in (num_decodes, 0):
        q, k, v, k_cache, v_cache, ctx, want = paged_step(backend, MIXED_SPANS, *shape, dtype, device,
                                                          num_decodes=nd, seed=seed + nd)
        close(attend(backend, q, k, v, k_cache, v_cache, ctx, shape[2] ** -0.5), want, TOLERANCE[dtype],
              f"cuda backend {shape} num_decodes={nd}")


def check_fused(shape, dtype, device, seed=0):
    from bunny_backend.model.layers import RMSNorm, apply_rotary, rotary_cos_sin
    from bunny_backend.ops.triton_fused import TritonDecoderOps
    heads, kv_heads, head_dim, rows = shape
    ops = TritonDecoderOps()
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen).to(dtype=dtype, device=device)   # noqa: E731
    hidden = heads * head_dim
    x, res = rand(rows, hidden), rand(rows, hidden)
    norm = RMSNorm(hidden, 1e-6).to(dtype=dtype, device=device)
    with torch.no_grad():
        norm.weight.copy_(1 + rand(hidden) / 4)
        y, total = ops.add_rms_norm(x, res, norm.weight, 1e-6)
        want_y, want_total = norm.add_forward(x, res)
        ulps(total, want_total, dtype, "add_rms_norm sum")
        ulps(y, want_y, dtype, "add_rms_norm")
        ulps(ops.rms_norm(x, norm.weight, 1e-6), norm(x), dtype, "rms_norm")
        s = x.double() + res.double()   # float64 formula, within the dtype's rounding of its steps
        exact = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
        close(y, exact.float(), 4 * ULP[dtype], "add_rms_norm vs float64")

    qkv = rand(rows, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 4096, (rows,), generator=gen).to(device)
    cos, sin = rotary_cos_sin(positions, head_dim, 1e6, dtype)
    q, k = ops.rotary_qk(qkv, cos, sin, heads, kv_heads, head_dim)
    q_ref, k_ref, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    ulps(q, apply_rotary(q_ref.reshape(rows, heads, head_dim), cos, sin), dtype, "rotary q")
    ulps(k, apply_rotary(k_ref.reshape(rows, kv_heads, head_dim), cos, sin), dtype, "rotary k")
    assert q.is_contiguous() and k.is_contiguous() and q.shape == (rows, heads, head_dim)

    gate_up = rand(rows, 2 * hidden + 2 * 1024 + 6)   # more than one program's tile, not a multiple of it
    gate, up = gate_up.chunk(2, -1)
    got = ops.silu_mul(gate_up)
    ulps(got, F.silu(gate) * up, dtype, "silu_mul")
    g = gate.double()
    close(got, (g / (1 + torch.exp(-g)) * up.double()).float(), 4 * ULP[dtype], "silu_mul vs float64")


def check_tuned_decode(shape, lens, tuning, dtype, device, seed=0):
    check_decode(shape, lens, (1, 3), dtype, device, seed, tuning)


def check_tuned_prefill(shape, spans, tuning, dtype, device, seed=0):
    check_prefill(shape, spans, dtype, device, seed, tuning)


def close(got, want, tol, what):
    got, want = got.float().cpu(), want.float().cpu()
    err = (got - want).abs() / (want.abs() + 1)
    if not err.max() <= tol:   # a NaN fails too
        at = [int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), err.shape)]
        raise AssertionError(f"{what}: error {err.max().item():.3g} > {tol:.3g} at {at} (got {got[tuple(at)]}, "
                             f"want {want[tuple(at)]})")


def ulps(got, want, dtype, what):
    """Within one unit in the last place of the dtype (relative to each value, absolute near zero)."""
    close(got, want, ULP[dtype] * 1.01, what)


def run(cases: dict, dtype, device) -> list[str]:
    """Every case; the failures' messages (and prints a line per case)."""
    failures = []
    checks = [(check_decode, c) for c in cases["decode"]] + [(check_prefill, c) for c in cases["prefill"]] \
        + [(check_mixed, (c,)) for c in cases["mixed"]] + [(check_fused, (c,)) for c in cases["fused"]] \
        + [(check_tuned_decode, c) for c in cases["tuned_decode"]] \
        + [(check_tuned_prefill, c) for c in cases["tuned_prefill"]]
    for i, (check, args) in enumerate(checks):
        t0 = time.perf_counter()
        try:
            check(*args, dtype, device, seed=i)
            status = "ok"
        except AssertionError as e:
            status = f"FAILED: {e}"
            failures.append(status)
        print(f"{check.__name__} {args[0]}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return failures


if __name__ == "__main__":
    fused_only = {**{kind: [] for kind in SMALL}, "fused": SMALL["fused"]}
    sys.exit(1 if run(SMALL, torch.float16, "cpu") + run(fused_only, torch.float32, "cpu") else 0)
