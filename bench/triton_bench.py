"""Our engine behind Triton: start `bunny-serve` on free ports, run the perf client's protocol over gRPC streaming.

The client is `bunny_client.perf.benchmark` (the same code as `bunny-client perf`); the server's KV gauge is
polled from the metrics endpoint while it runs; peak RSS is summed over the server's process tree.

Run as a worker: `python -m bench.triton_bench MODEL_PATH WORKLOAD_JSON KV_BYTES DTYPE` prints one BENCH_RESULT line.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import threading
import time
import urllib.request

from bunny_backend.server.launch import LaunchError, die_with_parent, free_ports, launch, serve_command, stop_process
from bench.common import Workload, emit, tree_peak_rss_bytes
from bunny_client.grpc_requests import BunnyStream, RequestOptions
from bunny_client.perf import benchmark as perf_benchmark
from bunny_client.perf import run_round

_GAUGE = re.compile(r"^(bunny_kv_blocks_(?:used|total))\{[^}]*\}\s+(\S+)$", re.M)


class Server:
    def __init__(self, model_path: str, params: dict[str, str], dtype: str, timeout_s: float = 600.0,
                 extra_args: list[str] = ()):
        self.grpc, self.http, self.metrics_port = free_ports(3)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-triton-", suffix=".log", delete=False)
        cmd = serve_command(model_path, [self.grpc, self.http, self.metrics_port], params,
                            ["--dtype", dtype, *extra_args])
        try:
            self.proc = launch(cmd, self.log, timeout_s, start_new_session=True, preexec_fn=die_with_parent)
        except LaunchError as e:
            raise RuntimeError(f"bunny-serve did not become ready ({e}); log {self.log.name}:\n{self.tail()}") from None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def tail(self, chars: int = 3000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def kv_gauges(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return {m.group(1): float(m.group(2)) for m in _GAUGE.finditer(r.read().decode())}

    def stop(self, timeout_s: float = 60.0) -> int:
        return stop_process(self.proc, timeout_s)


class GaugePoller(threading.Thread):
    """Max of bunny_kv_blocks_used, polled every `period` seconds (the model publishes it about as often)."""

    def __init__(self, server: Server, period: float = 0.1):
        super().__init__(daemon=True)
        self.server, self.period = server, period
        self.max_used, self.total = 0.0, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period):
            try:
                g = self.server.kv_gauges()
            except OSError:
                continue
            self.max_used = max(self.max_used, g.get("bunny_kv_blocks_used", 0.0))
            self.total = g.get("bunny_kv_blocks_total", self.total)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(5)


def benchmark(model_path: str, work: Workload, kv_cache_bytes: int, dtype: str, log=print) -> dict:
    params = {"kv_cache_memory_bytes": str(kv_cache_bytes), "max_num_seqs": str(max(16, max(work.batch_sizes))),
              "enable_prefix_caching": str(work.prefix_caching).lower(), "num_threads": str(work.threads),
              "cuda_graphs": str(work.cuda_graphs).lower(),
              "attention_backend": "auto", "tensor_parallel_size": str(work.tensor_parallel_size)}
    if work.quantization != "none":
        params["quantization"] = work.quantization
    t_start = time.perf_counter()
    server = Server(model_path, params, dtype)
    startup_s = time.perf_counter() - t_start
    poller = GaugePoller(server)
    try:
        opts = RequestOptions(text=work.prompt, images=[work.image], max_tokens=work.max_tokens, ignore_eos=True,
                              temperature=0.0, stream=True)
        one = dataclasses.replace(opts, max_tokens=1)
        with BunnyStream(server.url) as conn:
            for _ in range(work.warmup):
                run_round([conn], dataclasses.replace(opts, max_tokens=8))
            ttfts = []
            for _ in range(3):
                _, timings, errors = run_round([conn], one)
                if errors:
                    raise RuntimeError(f"a request failed: {errors[0]}; server log {server.log.name}:\n"
                                       f"{server.tail()}")
                ttfts.append(timings[0].ttft)
            ttfts.sort()
        poller.start()
        rows = perf_benchmark(server.url, opts, work.batch_sizes, rounds=work.rounds, warmup=0,
                              log=lambda m: log(f"triton  {m}"))
        rss = tree_peak_rss_bytes(server.proc.pid)
    finally:
        poller.stop()
        rc = server.stop()
    if any(r.failed for r in rows):
        log(f"triton: failed requests; server log {server.log.name}:\n{server.tail()}")
    return {"system": "triton", "rows": [r.as_dict() for r in rows], "ttft_1image_s": ttfts[0],
            "ttft_1image_median_s": ttfts[1], "peak_rss_bytes": rss, "kv_blocks_used_max": poller.max_used,
            "kv_blocks_total": poller.total, "server_startup_s": startup_s, "server_exit_status": rc,
            "server_params": params}


def main(argv: list[str]) -> None:
    model_path, work_json, kv_bytes, dtype = argv[0], argv[1], int(argv[2]), argv[3]
    work = Workload.from_json(work_json)
    emit(benchmark(model_path, work, kv_bytes, dtype, log=lambda m: print(m, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
