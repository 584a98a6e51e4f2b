"""What to run first on an Ascend machine: the NPU attention backend (the real torch_npu ATB ops) against the
portable backend on random data, with random non-contiguous block tables. Prints a pass/fail table.

    python -m bunny_backend.tools.check_npu_ops               # on the NPU, bfloat16 and float16
    python -m bunny_backend.tools.check_npu_ops --emulate     # anywhere: the same checks against the emulator

The reference is the portable backend in float32 on the CPU, fed the same (rounded) inputs, so only the op's own
arithmetic counts against the tolerance. Exit status 0 when every row passes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from bunny_backend.ops.attention import attend
from bunny_backend.utils.context import paged_context, token_slots

# (atol, rtol) per element, for unit-variance random inputs
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    """One prefill chunk (over each sequence's cached prefix), one decode step, and a mixed step that decodes some
    sequences while the others run their chunk, all on `device`."""
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    prefix: list[int]          # tokens already cached per sequence
    new: list[int]             # tokens in the prefill chunk per sequence
    tables: list[list[int]]    # physical blocks per sequence (random, non-contiguous)
    q: torch.Tensor            # [sum(new), H, D]
    k: torch.Tensor            # [sum(prefix) + sum(new) + B, Hkv, D]: prefix rows, chunk rows, decode rows
    v: torch.Tensor
    q_decode: torch.Tensor     # [B, H, D]

    def to(self, dtype, device) -> "Case":
        cast = {n: getattr(self, n).to(dtype=dtype, device=device) for n in ("q", "k", "v", "q_decode")}
        return Case(**{**self.__dict__, **cast})

    def slots(self, seq: int, start: int, end: int) -> list[int]:
        return token_slots(self.tables[seq], start, end, self.block_size)


def make_case(heads, kv_heads, head_dim, block_size, prefix, new, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    totals = [p + n + 1 for p, n in zip(prefix, new)]   # + the decode token
    need = [-(-t // block_size) for t in totals]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in need]
    rows = sum(totals)
    return Case(heads, kv_heads, head_dim, block_size, num_blocks, list(prefix), list(new), tables,
                q=torch.randn(sum(new), heads, head_dim, generator=gen),
                k=torch.randn(rows, kv_heads, head_dim, generator=gen),
                v=torch.randn(rows, kv_heads, head_dim, generator=gen),
                q_decode=torch.randn(len(new), heads, head_dim, generator=gen))


def run_case(backend, case: Case, dtype, device) -> dict[str, torch.Tensor]:
    """Drive `backend` as the engine does; returns float32 CPU results: the cache rows written, the prefill
    output, the decode output, and the output of a mixed step (see `_mixed_step`)."""
    c = case.to(dtype, device)
    B = len(c.new)
    k_cache, v_cache = backend.allocate_kv_cache(c.num_blocks, c.block_size, c.kv_heads, c.head_dim, dtype, device)
    n_prefix, n_new = sum(c.prefix), sum(c.new)
    pre_rows, new_rows, dec_rows = (slice(0, n_prefix), slice(n_prefix, n_prefix + n_new),
                                    slice(n_prefix + n_new, n_prefix + n_new + B))
    slots = lambda spans: torch.tensor(sum((c.slots(i, a, b) for i, (a, b) in spans), []),
                                       dtype=torch.int64, device=device)
    if n_prefix:
        backend.store_kv(c.k[pre_rows], c.v[pre_rows], k_cache, v_cache, slots(enumerate((0, p) for p in c.prefix)))
    totals = [p + n for p, n in zip(c.prefix, c.new)]
    ctx = paged_context(c.new, totals, c.tables, slots(enumerate(zip(c.prefix, totals))))
    k_new, v_new = c.k[new_rows], c.v[new_rows]
    backend.store_kv(k_new, v_new, k_cache, v_cache, ctx.slot_mapping)
    prefill = backend.prefill(c.q, k_new, v_new, k_cache, v_cache, ctx, c.head_dim ** -0.5)
    dctx = paged_context([1] * B, [t + 1 for t in totals], c.tables, slots(enumerate((t, t + 1) for t in totals)), B)
    backend.store_kv(c.k[dec_rows], c.v[dec_rows], k_cache, v_cache, dctx.slot_mapping)
    decode = backend.decode(c.q_decode, k_cache, v_cache, dctx, c.head_dim ** -0.5)
    every = torch.tensor(sum((c.slots(i, 0, t + 1) for i, t in enumerate(totals)), []), device=device)
    cached = torch.cat([k_cache.flatten(0, 1)[every], v_cache.flatten(0, 1)[every]])
    out = {"reshape_and_cache": cached, "prefill": prefill, "decode": decode}
    if B > 1:
        out["mixed"] = _mixed_step(backend, c, k_cache, v_cache, totals, slots)
    return {name: t.float().cpu() for name, t in out.items()}


def _mixed_step(backend, c: Case, k_cache, v_cache, totals, slots) -> torch.Tensor:
    """One step where the first half of the sequences decode (their chunk already cached) and the rest run their
    prefill chunk, decodes first as the engine packs them. Each row must equal the same row of `decode` or
    `prefill`. Rewrites the chunk rows of the prefilling sequences (same values) before attending."""
    B, n_prefix = len(c.new), sum(c.prefix)
    nd = B // 2
    rows = lambda i: slice(n_prefix + sum(c.new[:i]), n_prefix + sum(c.new[:i + 1]))
    dec = [n_prefix + sum(c.new) + i for i in range(nd)]
    q = torch.cat([c.q_decode[:nd]] + [c.q[sum(c.new[:i]):sum(c.new[:i + 1])] for i in range(nd, B)])
    k = torch.cat([c.k[dec]] + [c.k[rows(i)] for i in range(nd, B)])
    v = torch.cat([c.v[dec]] + [c.v[rows(i)] for i in range(nd, B)])
    spans = [(i, (totals[i], totals[i] + 1)) for i in range(nd)] + [(i, (c.prefix[i], totals[i])) for i in range(nd, B)]
    ctx = paged_context([1] * nd + c.new[nd:], [t + 1 for t in totals[:nd]] + totals[nd:],
                        c.tables, slots(spans), nd)
    backend.store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    return attend(backend, q, k, v, k_cache, v_cache, ctx, c.head_dim ** -0.5)


def reference(case: Case, dtype) -> dict[str, torch.Tensor]:
    """The portable backend in float32 on inputs rounded to `dtype` as the device saw them."""
    from bunny_backend.ops.attention_torch import TorchAttentionBackend
    rounded = case.to(dtype, "cpu").to(torch.float32, "cpu")
    return run_case(TorchAttentionBackend(), rounded, torch.float32, "cpu")


# (name, heads, kv_heads, head_dim, block_size, prefix lens, new lens); the name says which NPU op a prefill uses
CASES = [
    ("prefill (flash_attention), MHA", 16, 16, 128, 128, [0, 0, 0], [7, 130, 300]),
    ("prefill (flash_attention), GQA", 14, 2, 64, 128, [0, 0], [1, 257]),
    ("prefill over prefix (flash_attention_qlens), MHA", 16, 16, 128, 128, [0, 128, 300], [5, 64, 200]),
    ("prefill over prefix (flash_attention_qlens), GQA", 12, 2, 128, 128, [17, 256], [1, 130]),
    ("small blocks (block_size 16), GQA", 8, 2, 64, 16, [40, 0], [9, 33]),
]


def check(backend, dtype, device, cases=CASES) -> list[tuple[str, str, str, float, bool]]:
    rows = []
    for seed, (name, h, hkv, d, bs, prefix, new) in enumerate(cases):
        case = make_case(h, hkv, d, bs, prefix, new, seed=seed)
        try:
            got = run_case(backend, case, dtype, device)
        except Exception as e:   # a refused call is a failed row, not the end of the table
            rows.append((name, str(dtype).removeprefix("torch."), f"error: {type(e).__name__}: {e}",
                         float("nan"), False))
            continue
        want = reference(case, dtype)
        for part in got:
            diff = (got[part] - want[part]).abs()
            atol, rtol = (0.0, 0.0) if part == "reshape_and_cache" else TOLERANCE[dtype]   # a copy is exact
            ok = bool((diff <= atol + rtol * want[part].abs()).all())
            rows.append((name, str(dtype).removeprefix("torch."), part, diff.max().item(), ok))
    return rows


def print_table(rows, file=None) -> None:
    file = file or sys.stdout
    print(f"{'case':<52} {'dtype':<9} {'checked':<18} {'max |err|':>10}  result", file=file)
    for name, dtype, part, err, ok in rows:
        print(f"{name:<52} {dtype:<9} {part:<18} {err:>10.2e}  {'PASS' if ok else 'FAIL'}", file=file)
    failed = sum(not r[-1] for r in rows)
    print(f"{len(rows) - failed} passed, {failed} failed", file=file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=sorted(DTYPES))
    ap.add_argument("--emulate", action="store_true", help="use the plain-torch emulator on the CPU")
    args = ap.parse_args(argv)
    handle = None
    if args.emulate:
        from bunny_backend.ops.npu_emulator import install_emulator
        handle, device = install_emulator(), torch.device("cpu")
    else:
        device = torch.device("npu")
    try:
        from bunny_backend.ops.attention_npu import NpuAttentionBackend
        try:
            backend = NpuAttentionBackend()
        except ImportError as e:
            print(f"cannot import torch_npu ({e}); install it, or run with --emulate", file=sys.stderr)
            return 2
        if not args.emulate and not torch.npu.is_available():   # type: ignore[attr-defined]
            print("torch_npu is installed but sees no NPU", file=sys.stderr)
            return 2
        rows = [r for name in args.dtype for r in check(backend, DTYPES[name], device)]
    finally:
        if handle is not None:
            handle.uninstall()
    print_table(rows)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
