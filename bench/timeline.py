"""Where the Triton path's time goes: a per-token timeline on both sides of the wire (issue #16).

Starts bunny-serve with BUNNY_TIMELINE (backend/bunny_backend/stub/timeline.py: each request's arrival in execute() and its
acceptance by the engine (image decoding, tokenization), engine step start/end, each response's hand-over
to the responder thread, `sender.send` start and end), sends N streaming requests at once from the perf client's
streams, and stamps each token's arrival at the client. Joined on (request id, token count), every token gets:
engine step end -> send start (responder queue) -> send end (Triton's IPC) -> client callback (gRPC frontend, wire,
client). Prints the medians and the decode step period seen by the engine and by the client.

`python -m bench.timeline [--batch 10] [--max-tokens 64] [--text] [--model cpu]`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Workload, machine_info
from bench.models import SPECS, ensure_checkpoint
from bench.run import kv_cache_bytes
from bench.triton_bench import Server
from bunny_backend.stub.timeline import ENV
from bunny_client.grpc_requests import BunnyStream, RequestOptions


def client_round(url: str, opts: RequestOptions, n: int) -> list[tuple[str, int, float]]:
    """N requests at once; (request id, completion tokens so far, arrival time) per token-carrying response."""
    conns = [BunnyStream(url) for _ in range(n)]
    arrivals: list[list] = [[] for _ in range(n)]
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        start.wait()
        k = 0
        for d in conns[i].generate(opts):
            if d.ids:
                k += len(d.ids)
                arrivals[i].append((d.request_id, k, d.t))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return [a for per in arrivals for a in per]


def _ms(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.fmean(v),
            "p90_ms": 1e3 * v[int(0.9 * (len(v) - 1))], "count": len(v)}


def analyse(events: list[dict], arrivals: list[tuple[str, int, float]], batch: int) -> dict:
    steps = sorted((e for e in events if e["ev"] == "step"), key=lambda e: e["t0"])
    sends = {(e["rid"], e["k"]): e for e in events if e["ev"] == "send"}
    full = [s for s in steps if s["n"] == batch]            # decode steps of the whole batch
    gaps = [b["t0"] - a["t1"] for a, b in zip(steps, steps[1:]) if a["n"] == batch and b["n"] == batch]
    periods = [b["t0"] - a["t0"] for a, b in zip(full, full[1:])]
    queue_wait, send_s, to_client = [], [], []
    for rid, k, t in arrivals:
        e = sends.get((rid, k))
        if e is None:
            continue
        queue_wait.append(e["t0"] - e["handed"])
        send_s.append(e["t1"] - e["t0"])
        to_client.append(t - e["t1"])
    by_req: dict[str, list[float]] = {}
    for rid, _, t in sorted(arrivals, key=lambda a: (a[0], a[1])):
        by_req.setdefault(rid, []).append(t)
    client_itl = [b - a for ts in by_req.values() for a, b in zip(ts, ts[1:])]
    send_per_step: dict[float, float] = {}
    for e in sends.values():
        send_per_step[e["handed"]] = send_per_step.get(e["handed"], 0.0) + (e["t1"] - e["t0"])
    accepts = [e["t1"] - e["t0"] for e in events if e["ev"] == "accept"]
    return {"accept": _ms(accepts), "engine_step": _ms([s["t1"] - s["t0"] for s in full]), "between_steps": _ms(gaps),
            "engine_step_period": _ms(periods), "responder_queue_wait": _ms(queue_wait), "send": _ms(send_s),
            "sends_per_step_total": _ms(list(send_per_step.values())), "send_end_to_client": _ms(to_client),
            "client_inter_token": _ms(client_itl), "steps": len(steps), "tokens_matched": len(to_client)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpu", choices=sorted(SPECS))
    p.add_argument("--dtype", help="the servers' dtype (default: the bench model's own)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--text", action="store_true", help="text-only requests (default: one image each)")
    p.add_argument("--repository", type=Path, help="serve this model repository (e.g. a variant of model.py)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    spec = SPECS[args.model]
    path = str(ensure_checkpoint(spec))
    work = Workload(batch_sizes=[args.batch], max_tokens=args.max_tokens)
    trace = Path(tempfile.mkdtemp(prefix="bunny-timeline-")) / "server.jsonl"
    os.environ[ENV] = str(trace)
    params = {"kv_cache_memory_bytes": str(kv_cache_bytes(spec, work)), "max_num_seqs": str(max(16, args.batch)),
              "enable_prefix_caching": "false"}
    server = Server(path, params, (args.dtype or spec.dtype),
                    extra_args=["--repository", str(args.repository)] if args.repository else [])
    try:
        opts = RequestOptions(text=work.prompt, images=[] if args.text else [work.image], max_tokens=args.max_tokens,
                              ignore_eos=True, temperature=0.0, stream=True)
        client_round(server.url, dataclasses.replace(opts, max_tokens=8), 1)          # warm-up
        time.sleep(0.3)
        trace.unlink(missing_ok=True)
        arrivals = client_round(server.url, opts, args.batch)
        deadline = time.monotonic() + 10
        while not trace.is_file() and time.monotonic() < deadline:   # flushed when the engine goes idle
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        server.stop()
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    result = {"machine_info": machine_info(), "model": args.model, "batch": args.batch,
              "max_tokens": args.max_tokens, "image": not args.text, **analyse(events, arrivals, args.batch)}
    for key in ("accept", "engine_step", "between_steps", "engine_step_period", "responder_queue_wait", "send",
                "sends_per_step_total", "send_end_to_client", "client_inter_token"):
        r = result[key]
        if r:
            print(f"{key:22s} median {r['median_ms']:7.2f} ms  mean {r['mean_ms']:7.2f}  p90 {r['p90_ms']:7.2f}  (n={r['count']})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
