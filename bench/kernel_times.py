"""One layer's attention and elementwise kernels at the Bunny-2B shape (16 heads, MHA, head dim 128, blocks of 16,
bf16), on a CUDA GPU: the Triton kernels against what they replace. Prints a table; GPU-only.

    python -m bench.kernel_times

- decode: the paged-decode kernel at batch 1, 64 and 256 over ~900-token contexts, with the split count the
  kernel chooses and with one split (the kernel before #29);
- prefill: 128 image prompts (~770 new tokens each after a 120-token cached system prompt, ending mid-block)
  through the varlen kernel, against the portable per-sequence SDPA loop that such a batch took before;
- fused: RMSNorm with the residual add, rotary on q and k, SiLU x up over 64 and 4096 rows, against the PyTorch code.
"""
from __future__ import annotations

import sys

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK, HIDDEN, INTER = 16, 16, 128, 16, 2048, 5504
DTYPE = torch.bfloat16


def cuda_ms(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() on the GPU (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def paged(lens: list[int], gen: torch.Generator):
    blocks = [-(-n // BLOCK) for n in lens]
    perm = torch.randperm(sum(blocks) + 1, generator=gen)
    tables, at = [], 0
    for b in blocks:
        tables.append(perm[at:at + b].tolist())
        at += b
    width = max(blocks)
    table = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    cache = lambda: torch.randn(sum(blocks) + 1, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPE).cuda()  # noqa: E731
    return cache(), cache(), table, tables


def decode_rows(gen) -> list[str]:
    from bunny_backend.ops import triton_paged_decode as tpd
    rows = []
    for batch in (1, 64, 256):
        lens = [900 + (i * 37) % 64 for i in range(batch)]
        k_cache, v_cache, table, _ = paged(lens, gen)
        q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to(DTYPE).cuda()
        ctx_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        chosen = tpd.split_count(batch, KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count)
        auto = cuda_ms(lambda: tpd.paged_decode(q, k_cache, v_cache, table, ctx_lens, HEAD_DIM ** -0.5))
        one = cuda_ms(lambda: tpd.paged_decode(q, k_cache, v_cache, table, ctx_lens, HEAD_DIM ** -0.5, num_splits=1))
        rows.append(f"| decode, batch {batch} | {auto * 1000:.0f} us ({chosen} splits) | {one * 1000:.0f} us (1 split) |")
    return rows


def prefill_rows(gen) -> list[str]:
    from bunny_backend.ops import triton_prefill
    from bunny_backend.ops.attention_torch import TorchAttentionBackend
    from bunny_backend.utils.context import paged_context
    cached, new = 120, [770 + (i * 13) % 40 for i in range(128)]
    totals = [cached + n for n in new]
    k_cache, v_cache, _, tables = paged(totals, gen)
    q = torch.randn(sum(new), HEADS, HEAD_DIM, generator=gen).to(DTYPE).cuda()
    ctx = paged_context(new, totals, tables, torch.zeros(sum(new), dtype=torch.int64, device="cuda"))
    kernel = cuda_ms(lambda: triton_prefill.paged_prefill(q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q,
                                                          ctx.context_lens, HEAD_DIM ** -0.5), repeats=5)
    loop = cuda_ms(lambda: TorchAttentionBackend().prefill(q, q, q, k_cache, v_cache, ctx,
                                                         HEAD_DIM ** -0.5), repeats=3)
    return [f"| prefill, 128 prompts of ~790 after a 120-token prefix | {kernel:.2f} ms | {loop:.2f} ms "
            "(per-sequence SDPA) |"]


def fused_rows(gen) -> list[str]:
    import torch.nn.functional as F
    from bunny_backend.model.layers import RMSNorm, apply_rotary, rotary_cos_sin
    from bunny_backend.ops.triton_fused import TritonDecoderOps
    ops, rows = TritonDecoderOps(), []
    norm = RMSNorm(HIDDEN, 1e-6).to(DTYPE).cuda()
    for n in (64, 4096):
        rand = lambda *s: torch.randn(*s, generator=gen).to(DTYPE).cuda()   # noqa: E731
        x, res, qkv, gate_up = rand(n, HIDDEN), rand(n, HIDDEN), rand(n, 3 * HIDDEN), rand(n, 2 * INTER)
        cos, sin = rotary_cos_sin(torch.arange(n, device="cuda"), HEAD_DIM, 1e6, DTYPE)

        def torch_rotary():
            q, k, _ = qkv.split(HIDDEN, -1)
            return apply_rotary(q.view(n, HEADS, HEAD_DIM), cos, sin), apply_rotary(k.view(n, HEADS, HEAD_DIM), cos, sin)

        def torch_silu():
            gate, up = gate_up.chunk(2, -1)
            return F.silu(gate) * up

        for name, fused, plain in [("add_rms_norm", lambda: ops.add_rms_norm(x, res, norm.weight, 1e-6),
                                    lambda: norm.add_forward(x, res)),
                                   ("rotary_qk", lambda: ops.rotary_qk(qkv, cos, sin, HEADS, KV_HEADS, HEAD_DIM),
                                    torch_rotary),
                                   ("silu_mul", lambda: ops.silu_mul(gate_up), torch_silu)]:
            rows.append(f"| {name}, {n} rows | {cuda_ms(fused) * 1000:.0f} us | {cuda_ms(plain) * 1000:.0f} us |")
    return rows


@torch.inference_mode()
def main() -> int:
    if not torch.cuda.is_available():
        print("kernel_times: needs a CUDA device")
        return 1
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, {HEADS} heads (MHA) x {HEAD_DIM}, blocks of {BLOCK}, {DTYPE}")
    print("| kernel | Triton (#29) | before |\n| --- | --- | --- |")
    for part in (decode_rows, prefill_rows, fused_rows):
        try:
            for row in part(gen):
                print(row, flush=True)
        except Exception as e:   # noqa: BLE001 - one part failing leaves the others' figures
            print(f"| {part.__name__} | failed: {type(e).__name__}: {e} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
