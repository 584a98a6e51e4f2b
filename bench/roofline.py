"""The decode roofline: weight bytes per step over the machine's measured memory bandwidth.

Bandwidth is a STREAM-style copy of a large tensor (1 GiB by default): bytes read + bytes written over the time,
best of several, with torch's threads as the engine uses them. The write-allocate traffic a CPU cache adds is not
counted, as in STREAM's "copy" figure. A decode step only reads its weights, so the read bandwidth (a `sum()` over
the same tensor) is the fairer bound (issue #16's target: batch-1 decode >= 80% of it).
"""
from __future__ import annotations

import time

import torch

from bench.models import ModelSpec, decode_weight_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: str | torch.device = "cpu", size_bytes: int = 1 << 30, repeats: int = 6) -> dict:
    """Best and median copy bandwidth in bytes/s (read + write) of a `size_bytes` float32 tensor."""
    device = torch.device(device)
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                              # touch every page before timing
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    times.sort()
    moved = 2 * size_bytes
    return {"bytes_per_s": moved / times[0], "median_bytes_per_s": moved / times[len(times) // 2],
            "size_bytes": size_bytes, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device)}


def measure_read_bandwidth(device: str | torch.device = "cpu", size_bytes: int = 1 << 30, repeats: int = 6) -> dict:
    """Best and median read bandwidth in bytes/s: `sum()` of a `size_bytes` float32 tensor."""
    device = torch.device(device)
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    src.sum()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        src.sum()
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src
    times.sort()
    return {"bytes_per_s": size_bytes / times[0], "median_bytes_per_s": size_bytes / times[len(times) // 2],
            "size_bytes": size_bytes, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device)}


def roofline(spec: ModelSpec, bandwidth_bytes_per_s: float, batch1_decode_tok_s: float | None = None,
             read_bytes_per_s: float | None = None) -> dict:
    """Batch-1 decode tokens/s the bandwidth allows, and the measured rate as a fraction of it (and of the read
    bandwidth, where measured)."""
    weight_bytes = decode_weight_bytes(spec, batch=1)
    bound = bandwidth_bytes_per_s / weight_bytes
    out = {"decode_weight_bytes": weight_bytes, "bandwidth_bytes_per_s": bandwidth_bytes_per_s,
           "roofline_tok_s": bound}
    if read_bytes_per_s:
        out["read_bandwidth_bytes_per_s"] = read_bytes_per_s
        out["read_roofline_tok_s"] = read_bytes_per_s / weight_bytes
    if batch1_decode_tok_s:
        out["engine_batch1_decode_tok_s"] = batch1_decode_tok_s
        out["fraction_of_roofline"] = batch1_decode_tok_s / bound
        if read_bytes_per_s:
            out["fraction_of_read_bandwidth"] = batch1_decode_tok_s * weight_bytes / read_bytes_per_s
    return out


if __name__ == "__main__":
    from bench.models import CPU
    bw = measure_bandwidth("cuda" if torch.cuda.is_available() else "cpu")
    print(f"copy bandwidth: best {bw['bytes_per_s'] / 1e9:.1f} GB/s, median {bw['median_bytes_per_s'] / 1e9:.1f} GB/s "
          f"({bw['threads']} threads)")
    r = roofline(CPU, bw["bytes_per_s"])
    print(f"cpu model: {r['decode_weight_bytes'] / 1e6:.0f} MB per decode step -> {r['roofline_tok_s']:.1f} tok/s bound")
