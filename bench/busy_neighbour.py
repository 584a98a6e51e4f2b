"""Decode beside a busy neighbour: tokens/s of one request, quiet and with `yes > /dev/null` running, for the
engine's adaptive thread count (num_threads 0, engine/worker/cpu_threads.py) and a fixed count (every core, as
before), in one run, alternated per round so all four see the same machine. `--server`: through bunny-serve and
the gRPC client (one streamed chat request with the example image, as `./build.sh run`; tokens over the whole
request's time); else engine-direct (one text request's decode, its first token excluded).

`python -m bench.busy_neighbour [--server] [--only adaptive|fixed] [--model demo|qwen] [--tokens 256] [--rounds 2]
[--neighbours 1] [--out FILE]`
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import machine_info
from bench.models import SPECS, ensure_checkpoint
from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker.device import host_cores
from bunny_backend.server.launch import free_ports, launch, serve_command
from bunny_backend.tools.run_demo import example_image, stop_server

DEMO = Path(__file__).resolve().parent.parent / "models" / "bunny-demo"


def decode_rate(engine: LLMEngine, tokens: int) -> float:
    """Tokens/s of one text request's decode (its prefill and first token excluded)."""
    engine.add_request(None, "Describe a busy street in detail.", [],
                       SamplingParams(max_tokens=tokens, ignore_eos=True))
    first = None
    count = 0
    while engine.has_unfinished():
        for out in engine.step():
            count += len(out.delta_token_ids)
            if first is None and count:
                first, count = time.perf_counter(), 0
    return count / (time.perf_counter() - first)


class Engine:
    """An engine built and stepped on a thread of its own, as the server's is: OpenMP's thread count is a
    per-thread setting, so two engines stepped on one thread would run at whatever count the last one set."""

    def __init__(self, path: str, dtype: str, threads: int):
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.engine = self.thread.submit(LLMEngine, EngineConfig(model_path=path, dtype=dtype, num_threads=threads,
                                                                 kv_cache_memory_bytes=256 << 20)).result()

    def rate(self, tokens: int) -> float:
        return self.thread.submit(decode_rate, self.engine, tokens).result()

    def close(self) -> None:
        self.thread.submit(self.engine.shutdown).result()
        self.thread.shutdown()


class Server:
    def __init__(self, path: str, dtype: str, threads: int):
        params = {"dtype": dtype} | ({"num_threads": str(threads)} if threads else {})
        self.ports = free_ports(3)
        self.log = open(Path("build") / f"busy_neighbour-server-{threads}.log", "w")
        self.proc = launch(serve_command(path, self.ports, params, ["--exit-timeout", "5"]), self.log, 900)
        self.image = example_image().read_bytes()

    def rate(self, tokens: int) -> float:
        from bunny_client.chat import chat
        return chat(f"127.0.0.1:{self.ports[0]}", "Describe this image in detail.", self.image, stream=True,
                    max_tokens=tokens, ignore_eos=True).tokens_per_s

    def close(self) -> None:
        stop_server(self.proc)
        self.log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo, or a bench model: " + ", ".join(SPECS))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--neighbours", type=int, default=1, help="busy processes (`yes`) in the contended runs")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--server", action="store_true", help="through bunny-serve and the gRPC client")
    ap.add_argument("--only", choices=("adaptive", "fixed"),
                    help="one system (engine-direct: run each in its own process, alternating; two engines in one "
                         "process share OpenMP's pools and disturb each other)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    path = str(DEMO) if args.model == "demo" else str(ensure_checkpoint(SPECS[args.model]))
    cores = host_cores()
    kind = Server if args.server else Engine
    systems = [(name, threads) for name, threads in (("adaptive", 0), (f"fixed {cores}", cores))
               if args.only is None or name.startswith(args.only)]
    engines = {name: kind(path, args.dtype, threads) for name, threads in systems}
    try:
        return measure(args, engines, cores)
    finally:
        for engine in engines.values():
            engine.close()


def measure(args, engines: dict, cores: int) -> int:
    for engine in engines.values():
        engine.rate(16)   # first-use costs out of the figures
    rates: dict[str, list[float]] = {f"{name}, {load}": [] for name in engines for load in ("quiet", "busy")}
    for _ in range(args.rounds):
        for load in ("quiet", "busy"):
            count = args.neighbours if load == "busy" else 0
            hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(count)]
            try:
                for name, engine in engines.items():
                    engine.rate(32)   # a neighbour's arrival is found in a trial or two: not measured
                    rates[f"{name}, {load}"].append(engine.rate(args.tokens))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    result = {"model": args.model, "path": "server" if args.server else "engine-direct", "tokens": args.tokens,
              "neighbours": args.neighbours, "cores": cores,
              "torch_threads": torch.get_num_threads(), "machine": machine_info(),
              "tokens_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()}}
    for name in engines:
        quiet, busy = statistics.median(rates[f"{name}, quiet"]), statistics.median(rates[f"{name}, busy"])
        result[f"{name}: busy / quiet"] = round(busy / quiet, 3)
        print(f"{name:>10}: quiet {quiet:7.1f} tok/s, busy {busy:7.1f} tok/s ({busy / quiet:.0%} of quiet)")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
