"""The server's own overhead: Triton end-to-end against engine-direct, measured in alternation (issue #16).

`./build.sh bench` runs engine-direct and Triton minutes apart, and on a machine that other processes share the
load changes in between by more than the gap being measured. Here one bunny-serve and one engine in a worker
process of its own (same checkpoint, dtype, threads, KV cache, prefix caching off) take turns: a round of N
requests at once through Triton (the perf client's gRPC streams, one image per request as in the bench), then the
same round in the worker (engine_direct's loop), `--repeats` times, the order flipped each time.
The idle one waits without using the CPU. Prints tokens/s of each round and the median ratio, and the CPU time each
system used per generated token (its processes', the client's included for Triton): on a machine whose cores the
engine keeps busy, whatever the Triton path spends beyond the engine's own CPU time comes out of the engine's.

`python -m bench.overhead [--model cpu] [--batch 10] [--max-tokens 64] [--repeats 4] [--repository DIR]`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import Workload, cpu_busy_seconds, machine_info, tree_cpu_seconds
from bench.engine_direct import make_engine
from bench.engine_direct import run_round as engine_round
from bench.models import SPECS, ensure_checkpoint
from bench.run import kv_cache_bytes
from bench.triton_bench import Server
from bunny_client.grpc_requests import BunnyStream, RequestOptions
from bunny_client.perf import run_round as triton_round


def _self_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class EngineWorker:
    """engine-direct in its own process (as the bench runs it), one round per command on its stdin."""

    def __init__(self, path: str, work: Workload, kv: int, dtype: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.overhead", "--worker", path, work.to_json(), str(kv),
                                      dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the engine worker did not start")

    def round(self, n: int, max_tokens: int, tag: str) -> tuple[float, int]:
        self.proc.stdin.write(f"{n} {max_tokens} {tag}\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return r["wall"], r["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def worker(argv: list[str]) -> int:
    path, work, kv, dtype = argv[0], Workload.from_json(argv[1]), int(argv[2]), argv[3]
    if work.threads:
        torch.set_num_threads(work.threads)
    engine = make_engine(path, work, kv, dtype)
    print("READY", flush=True)
    for line in sys.stdin:
        n, max_tokens, tag = line.split()
        wall, timings, _ = engine_round(engine, work, int(n), int(max_tokens), None, tag)
        print(json.dumps({"wall": wall, "tokens": sum(t.tokens for t in timings)}), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpu", choices=sorted(SPECS))
    p.add_argument("--dtype", help="the servers' dtype (default: the bench model's own)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repository", type=Path, help="serve this model repository (e.g. a variant of model.py)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    spec = SPECS[args.model]
    path = str(ensure_checkpoint(spec))
    work = Workload(batch_sizes=[args.batch], max_tokens=args.max_tokens, threads=args.threads)
    kv = kv_cache_bytes(spec, work)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = {"kv_cache_memory_bytes": str(kv), "max_num_seqs": str(max(16, args.batch)),
              "enable_prefix_caching": "false", "num_threads": str(args.threads)}
    server = Server(path, params, (args.dtype or spec.dtype),
                    extra_args=["--repository", str(args.repository)] if args.repository else [])
    engine = EngineWorker(path, work, kv, (args.dtype or spec.dtype))
    opts = RequestOptions(text=work.prompt, images=[work.image], max_tokens=args.max_tokens, ignore_eos=True,
                          temperature=0.0, stream=True)
    rows: list[dict] = []
    busy0, t0 = cpu_busy_seconds(), time.perf_counter()
    try:
        conns = [BunnyStream(server.url) for _ in range(args.batch)]
        for n in (1, args.batch):                 # warm-up, the batch too (first-touch of its buffers)
            triton_round(conns[:n], dataclasses.replace(opts, max_tokens=8))
            engine.round(n, 8, f"warm{n}")

        for rep in range(args.repeats):
            order = ("triton", "engine") if rep % 2 == 0 else ("engine", "triton")
            row = {}
            for system in order:
                if system == "triton":
                    cpu0 = tree_cpu_seconds(server.proc.pid) + _self_cpu()
                    wall, timings, errors = triton_round(conns, opts)
                    if errors:
                        raise RuntimeError(f"triton round failed: {errors[0]}; log {server.log.name}")
                    tokens = sum(t.tokens for t in timings)
                    cpu = tree_cpu_seconds(server.proc.pid) + _self_cpu() - cpu0
                else:
                    cpu0 = tree_cpu_seconds(engine.proc.pid)
                    wall, tokens = engine.round(args.batch, args.max_tokens, f"r{rep}")
                    cpu = tree_cpu_seconds(engine.proc.pid) - cpu0
                row[system] = tokens / wall
                row[f"{system}_cpu_ms_per_token"] = 1e3 * cpu / tokens
            row["ratio"] = row["triton"] / row["engine"]
            rows.append(row)
            print(f"repeat {rep}: triton {row['triton']:7.1f} tok/s  engine {row['engine']:7.1f} tok/s  "
                  f"triton/engine {100 * row['ratio']:.0f}%;  CPU per token: triton "
                  f"{row['triton_cpu_ms_per_token']:.2f} ms, engine {row['engine_cpu_ms_per_token']:.2f} ms", flush=True)
        for c in conns:
            c.close()
    finally:
        server.stop()
        engine.close()
    wall = time.perf_counter() - t0
    ratio = statistics.median(r["ratio"] for r in rows)
    extra = statistics.median(r["triton_cpu_ms_per_token"] - r["engine_cpu_ms_per_token"] for r in rows)
    info = machine_info()
    print(f"median triton/engine at batch {args.batch}: {100 * ratio:.0f}% ({info.get('cpu_model')}, "
          f"machine busy {100 * (cpu_busy_seconds() - busy0) / (wall * info['cpu_count']):.0f}% of all cores, "
          f"load average {info['loadavg'][0]:.1f}); the Triton path's own CPU: {extra:.2f} ms per token")
    if args.out:
        args.out.write_text(json.dumps({"machine_info": info, "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows, "median_ratio": ratio,
                                        "median_extra_cpu_ms_per_token": extra}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
