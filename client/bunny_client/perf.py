"""`bunny-client perf`: the seed's performance run (batch 1-10, 256 output tokens) against the server.

For each batch size N: N streaming requests with `ignore_eos` sent at once (one stream each, connected before the
clock starts), `--rounds` times. Reports requests/s and output tokens/s (totals over wall time), time to first
token (mean, p90) and mean inter-token latency; writes perf.{txt,csv,json,png} into --out, and with
`--perf-analyzer` also Triton's perf_analyzer sweep over the same request.
"""
from __future__ import annotations

import argparse
import functools
import io
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .captions import DEFAULT_PROMPT
from .grpc_requests import DEFAULT_URL, BunnyClientError, BunnyStream, RequestOptions
from .perf_report import format_table, write_report
from .perf_stats import BatchStats, RequestTiming, parse_batch_sizes, summarize


def synthetic_image(size: int = 384) -> bytes:
    """A deterministic PNG (colour gradients) for when no --image is given."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def all_at_once(jobs: list[Callable[[], object]]) -> tuple[float, list]:
    """Run each job on its own thread, all released together: wall seconds from the release until the last one
    ends, and each job's result or the exception it raised."""
    out: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs) + 1)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = jobs[i]()
        except Exception as e:   # noqa: BLE001 - reported with the round
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def _timed(conn: BunnyStream, opts: RequestOptions) -> RequestTiming:
    timing = RequestTiming(sent=time.perf_counter())
    for delta in conn.generate(opts):
        timing.record(delta.t, len(delta.ids))
    return timing


def run_round(conns: list[BunnyStream], opts: RequestOptions) -> tuple[float, list[RequestTiming], list[str]]:
    """All requests at once; returns wall seconds, the timings of those that completed, and the errors."""
    wall, out = all_at_once([functools.partial(_timed, c, opts) for c in conns])
    return wall, [r for r in out if isinstance(r, RequestTiming)], [str(r) for r in out if not isinstance(r, RequestTiming)]


def benchmark(url: str, opts: RequestOptions, batch_sizes: list[int], rounds: int = 3, warmup: int = 1,
              log=print) -> list[BatchStats]:
    conns: list[BunnyStream] = []
    rows = []
    try:
        conns.append(BunnyStream(url))
        for _ in range(warmup):
            run_round(conns[:1], opts)
        for n in batch_sizes:
            while len(conns) < n:
                conns.append(BunnyStream(url))
            results, failed = [], 0
            for _ in range(rounds):
                wall, timings, errors = run_round(conns[:n], opts)
                results.append((wall, timings))
                failed += len(errors)
                for e in sorted(set(errors)):
                    log(f"batch {n}: request failed: {e}")
            rows.append(summarize(n, results, failed))
            r = rows[-1]
            log(f"batch {n}: {r.requests_per_s:.2f} req/s, {r.output_tokens_per_s:.1f} tok/s, "
                f"TTFT {r.ttft_mean_ms:.0f} ms, ITL {r.itl_mean_ms:.1f} ms")
    finally:
        for c in conns:
            c.close()
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("perf", help="throughput and latency for 1..N concurrent requests (ignore_eos)")
    p.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address (default %(default)s)")
    p.add_argument("--image", type=Path, help="image sent with every request (default: a generated 384x384 PNG)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="default %(default)r")
    p.add_argument("--batch-sizes", default="1-10", help="e.g. 1-10, 1,2,4,8 (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per batch size (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="single requests before measuring (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("perf_results"), help="report folder (default %(default)s)")
    p.add_argument("--perf-analyzer", action="store_true", help="also run Triton's perf_analyzer sweep")
    p.add_argument("--pa-request-count", type=int, default=4, help="perf_analyzer requests per measurement window")
    p.add_argument("--pa-arg", action="append", default=[], metavar="ARG", help="extra perf_analyzer argument")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        sizes = parse_batch_sizes(args.batch_sizes)
        image = args.image.read_bytes() if args.image else synthetic_image()
    except (ValueError, OSError) as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 2
    opts = RequestOptions(text=args.prompt, images=[image], max_tokens=args.max_tokens, ignore_eos=True,
                          temperature=0.0, stream=True)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        rows = benchmark(args.url, opts, sizes, args.rounds, args.warmup, log)
    except BunnyClientError as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    meta = {"url": args.url, "prompt": args.prompt, "image": str(args.image or "synthetic 384x384 PNG"),
            "max_tokens": args.max_tokens, "rounds": args.rounds, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "title": f"bunny on Triton: {args.max_tokens} output tokens, ignore_eos"}
    paths = write_report(rows, args.out, meta)
    print(format_table(rows))
    print(f"report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    if args.perf_analyzer:
        from .perf_analyzer import PerfAnalyzerMissing, run_perf_analyzer

        try:
            log_path = run_perf_analyzer(args.url, args.prompt, image, args.max_tokens, max(sizes), args.out,
                                         args.pa_request_count, args.pa_arg)
        except (PerfAnalyzerMissing, RuntimeError) as err:
            print(f"bunny-client: {err}", file=sys.stderr)
            return 1
        print(f"perf_analyzer: {log_path}", file=sys.stderr)
    failed = sum(r.failed for r in rows)
    return 1 if failed and not any(r.requests for r in rows) else 0
