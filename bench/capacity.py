"""Serving capacity: many concurrent streams of a model small enough that the engine is not the bottleneck, so the
serving path is (every response a round trip between the model's stub, tritonserver and the client).

For each stream count N: engine-direct (the engine in this process, stepped in a loop), Triton gRPC streaming
(bunny-serve, one gRPC stream per request, 8 channels) and the OpenAI front (streamed chat completions); each with
output tokens/s, TTFT p50/p99, inter-token latency p50/p99 (per token: a response carrying k tokens counts k) and
tokens per response. Every system runs with max_num_seqs = N, so all N streams decode together.

Where the CPU went: engine-direct's own CPU seconds (`engine_cpu_s`); for a server started here, each of its
processes' CPU seconds during the run (`server_cpu_s`: bunny-serve's front, tritonserver, the model's stub, which
runs the engine) beside the client's (`client_cpu_s`); with engine-direct in the same run, what the serving path
added to the engine's own CPU, in all and per response (`<system>_serving_cpu`). On a host whose cores the engine
shares, that is what the responses cost the engine.

    python -m bench.capacity [--streams 64,256] [--max-tokens 256] [--model-path DIR] [--url HOST:PORT
                             --openai-url URL]   # --url: measure a server already running (e.g. another revision)

The client is Python asyncio on the same cores as the server: at hundreds of streams it takes a share of them,
which the results record (client CPU seconds). Results: bench/results/capacity-<machine>-<date>.json.
"""
from __future__ import annotations

import os

from bunny_backend.utils.engine_env import engine_env

os.environ.update(engine_env(dict(os.environ)))   # before torch loads: engine-direct runs as a server's engine does

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import machine_info, machine_name, tree_cpu_by_name  # noqa: E402
from bench.models import ROOT  # noqa: E402
from bunny_client.perf_stats import RequestTiming  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["Tell me a story about the sea.", "What is a rabbit?", "请描述这张图片。", "Write a poem."]


def summary(wall: float, timings: list[RequestTiming]) -> dict:
    tokens = sum(t.tokens for t in timings)
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    itls = [t.itl for t in timings if t.itl is not None]
    pct = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 2) if xs else None   # noqa: E731
    return {"requests": len(timings), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "itl_p50_ms": pct(itls, 50), "itl_p99_ms": pct(itls, 99),
            "tokens_per_response": round(tokens / max(1, sum(t.responses for t in timings)), 2)}


def engine_direct(model_path: str, n: int, max_tokens: int) -> dict:
    from bunny_backend.config import EngineConfig
    from bunny_backend.engine.llm_engine import LLMEngine
    from bunny_backend.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model_path=model_path, device="cpu", max_num_seqs=n,
                                    max_num_batched_tokens=max(4096, n), enable_prefix_caching=False))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    timings = {}
    for i in range(n):
        engine.add_request(f"r{i}", PROMPTS[i % len(PROMPTS)], [], params)
        timings[f"r{i}"] = RequestTiming(sent=t0)
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            timings[out.request_id].record(now, len(out.delta_token_ids))
    result = summary(time.perf_counter() - t0, list(timings.values()))
    result["engine_cpu_s"] = round(cpu_seconds() - c0, 2)
    engine.shutdown()
    return result


def stream_inputs(prompt: str, max_tokens: int) -> dict[str, np.ndarray]:
    return {"text_input": np.array([prompt.encode()], dtype=np.object_), "stream": np.array([True]),
            "max_tokens": np.array([max_tokens], dtype=np.int32), "ignore_eos": np.array([True])}


async def triton_streams(url: str, n: int, max_tokens: int) -> dict:
    from bunny_backend.server.openai.options import FrontOptions
    from bunny_backend.server.openai.triton_client import TritonClient

    clients = [TritonClient(FrontOptions(url)) for _ in range(8)]

    async def one(i: int) -> RequestTiming:
        timing = RequestTiming(sent=time.perf_counter())
        async for r in clients[i % len(clients)].generate(stream_inputs(PROMPTS[i % len(PROMPTS)], max_tokens)):
            timing.record(time.perf_counter(), len(r.ids))
        return timing

    try:
        t0 = time.perf_counter()
        timings = await asyncio.gather(*(one(i) for i in range(n)))
        return summary(time.perf_counter() - t0, list(timings))
    finally:
        for c in clients:
            await c.close()


async def openai_streams(base_url: str, n: int, max_tokens: int) -> dict:
    connector = aiohttp.TCPConnector(limit=n)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def one(i: int) -> RequestTiming:
            body = {"model": "bunny", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "return_token_ids": True}
            timing = RequestTiming(sent=time.perf_counter())
            async with session.post(f"{base_url}/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    ids = [t for c in chunk.get("choices", []) for t in (c.get("token_ids") or [])]
                    timing.record(time.perf_counter(), len(ids))
            return timing

        t0 = time.perf_counter()
        timings = await asyncio.gather(*(one(i) for i in range(n)))
        return summary(time.perf_counter() - t0, list(timings))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(fn, *args, server_pid: int | None = None) -> dict:
    """fn(target, n, max_tokens) after a short warm-up round on the same target (first requests pay for loading);
    with server_pid, the CPU seconds of that server's processes during the run too."""
    run = (lambda *a: asyncio.run(fn(*a))) if asyncio.iscoroutinefunction(fn) else fn
    run(args[0], 4, 8)
    s0 = tree_cpu_by_name(server_pid) if server_pid else {}
    c0 = cpu_seconds()
    out = run(*args)
    if "engine_cpu_s" not in out:   # engine-direct has no client: its own CPU is engine_cpu_s (loading excluded)
        out["client_cpu_s"] = round(cpu_seconds() - c0, 2)
    if server_pid:
        s1 = tree_cpu_by_name(server_pid)
        out["server_cpu_s"] = {name: round(t - s0.get(name, 0.0), 2) for name, t in s1.items()
                               if t - s0.get(name, 0.0) >= 0.01}
    return out


def serving_cpu(system: dict, engine: dict) -> dict:
    """What the serving path cost beyond the engine: the server's and client's CPU seconds less engine-direct's for
    the same tokens, in all and per response."""
    extra = system["client_cpu_s"] + sum(system["server_cpu_s"].values()) - engine["engine_cpu_s"]
    responses = system["tokens"] / system["tokens_per_response"] if system["tokens_per_response"] else 0
    return {"extra_cpu_s": round(extra, 2),
            "extra_cpu_ms_per_response": round(1000 * extra / responses, 3) if responses else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="64,256", help="stream counts, comma-separated (1024 works, slowly)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--model-path", default=str(ROOT / "models" / "bunny-demo"))
    p.add_argument("--url", help="a running server's gRPC address (then no server is started here)")
    p.add_argument("--openai-url", help="with --url: its OpenAI base URL (http://HOST:PORT/v1)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine parameter for the server started here (repeatable), e.g. stream_interval=4")
    p.add_argument("--label", default="", help="a name for this run in the results (e.g. the revision)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.streams.split(",") if x]
    rows = []
    for n in counts:
        row = {"streams": n}
        if not args.skip_engine:
            row["engine"] = measured(engine_direct, args.model_path, n, args.max_tokens)
            print(f"{n} streams, engine-direct: {row['engine']}", flush=True)
        with serving(args, n) as (url, openai_url, pid):
            row["triton"] = measured(triton_streams, url, n, args.max_tokens, server_pid=pid)
            print(f"{n} streams, Triton gRPC: {row['triton']}", flush=True)
            if openai_url:
                row["openai"] = measured(openai_streams, openai_url, n, args.max_tokens, server_pid=pid)
                print(f"{n} streams, OpenAI front: {row['openai']}", flush=True)
        if "engine" in row:
            for system in ("triton", "openai"):
                if system in row:
                    row[f"{system}_over_engine"] = round(row[system]["tokens_per_s"] / row["engine"]["tokens_per_s"], 3)
                    if "server_cpu_s" in row[system]:
                        row[f"{system}_serving_cpu"] = serving_cpu(row[system], row["engine"])
        rows.append(row)
    info = machine_info()
    out = args.out or RESULTS / f"capacity-{machine_name(info)}-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps({"machine": info, "label": args.label, "max_tokens": args.max_tokens,
                               "model_path": args.model_path, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


class serving:
    """bunny-serve on the model with max_num_seqs = n (and its OpenAI front), or the server given with --url."""

    def __init__(self, args, n: int):
        self.args, self.n, self.proc = args, n, None

    def __enter__(self):
        if self.args.url:
            return self.args.url, self.args.openai_url, None
        import sys

        from bunny_backend.server.launch import free_ports, launch, serve_command
        grpc, http, metrics, openai_port = free_ports(4)
        params = {"max_num_seqs": str(self.n), "max_num_batched_tokens": str(max(4096, self.n)),
                  "enable_prefix_caching": "false", **dict(kv.split("=", 1) for kv in self.args.param)}
        cmd = serve_command(self.args.model_path, [grpc, http, metrics], params,
                            ["--device", "cpu", "--openai-port", str(openai_port)])
        self.proc = launch(cmd, sys.stderr, 600)
        return f"127.0.0.1:{grpc}", f"http://127.0.0.1:{openai_port}/v1", self.proc.pid

    def __exit__(self, *exc):
        if self.proc is not None:
            from bunny_backend.server.launch import stop_process
            stop_process(self.proc)


if __name__ == "__main__":
    raise SystemExit(main())
