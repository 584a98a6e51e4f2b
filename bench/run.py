"""`./build.sh bench`: engine direct vs engine through Triton vs transformers generate, on one machine; then the
serving-under-load scenarios (bench/scenarios.py: stall, arrivals, same image twice).

`--peer vllm` runs the peer comparison instead (bench/peer/run.py: bunny-serve against vLLM CPU's server).

Each system and scenario runs in its own worker process (`python -m bench.<worker>`), one after the other, so peak
RSS is each one's own and none competes with another for the cores. `--baseline REV` also runs engine-direct and
the stall and arrivals scenarios on git revision REV's engine, for before/after ratios from one run. Results:
bench/results/<machine>-<date>.json (and a .png of tokens/s against batch size next to it) plus a printed table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.baseline import baseline_env
from bench.repeat import alternate, median_of
from bench.common import Workload, children_cpu_seconds, cpu_busy_seconds, machine_info, machine_name
from bench.models import ROOT, SPECS, ModelSpec, describe, ensure_checkpoint, kv_bytes_per_token
from bench.roofline import measure_bandwidth, measure_read_bandwidth, roofline
from bench.scenarios import SCENARIOS, parse_knobs, run_scenarios, scenario_targets
from bunny_backend.utils.engine_env import engine_env
from bunny_client.perf_stats import parse_batch_sizes

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BATCHES = "1-10"
DEFAULT_MAX_TOKENS = 256
# On 2 CPU cores a full 1..10 transformers sweep at 256 tokens takes ~6 min of the ~15: every other size is swept.
DEFAULT_HF_BATCHES_CPU = "1,2,4,6,8,10"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./build.sh bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 32 new tokens, batch sizes 1,4,10")
    p.add_argument("--batch-sizes", help=f"e.g. 1-10 or 1,4,10 (default {DEFAULT_BATCHES})")
    p.add_argument("--hf-batch-sizes", help="transformers' batch sizes (default: --batch-sizes, except on CPU "
                                            f"without --batch-sizes: {DEFAULT_HF_BATCHES_CPU})")
    p.add_argument("--max-tokens", type=int, help=f"new tokens per request (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--rounds", type=int, default=1, help="rounds per batch size (default %(default)s)")
    p.add_argument("--model", choices=("cpu", "2b", "both"), default=None,
                   help="cpu: the ~170M CPU-sized model; 2b: Bunny-v1_0-2B-zh's shape (needs CUDA); "
                        "default: both with CUDA, else cpu")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-triton", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep the engine's prefix cache on (off by default: identical requests would skip prefill)")
    p.add_argument("--distinct-images", action="store_true",
                   help="a different image in each engine request (bench/images.py), as real traffic has: with "
                        "--prefix-caching only the system prompt is shared (the Triton run still sends one image)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode eagerly on CUDA (engine and triton; graphs are the default)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per system, per rank under tensor parallelism (default: all cores, split "
                        "between the ranks)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="run the engine (as engine-tp, beside the one-rank engine) and Triton sharded over N ranks")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="load scenarios to run after the throughput rows, comma-separated, or 'none' "
                        "(default %(default)s)")
    p.add_argument("--baseline", metavar="REV", help="also run engine-direct and the stall/arrivals scenarios on "
                                                     "this git revision's engine (e.g. the commit before a change)")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --baseline: run each before/after pair this often, alternating, and keep medians")
    p.add_argument("--arrival-rate", type=float, default=1.0,
                   help="arrivals scenario: requests/s (default %(default)s)")
    p.add_argument("--arrivals-duration", type=float, default=60.0, help="arrivals scenario: seconds of arrivals")
    p.add_argument("--quantization", choices=("none", "int8", "w8a8", "fp8"), default="none",
                   help="our engine's and Triton's weights quantized at load (transformers' row stays unquantized)")
    p.add_argument("--knob", action="append", default=[], metavar="KEY=VALUE",
                   help="an EngineConfig field for the scenarios' engines (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<machine>-<date>.json)")
    args = p.parse_args(argv)
    args.scenarios = [] if args.scenarios == "none" else [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    args.knobs = parse_knobs(args.knob)
    if args.quantization != "none":   # the scenarios' engines too
        args.knobs.setdefault("quantization", args.quantization)
    if args.quick:
        args.batch_sizes = args.batch_sizes or "1,4,10"
        args.max_tokens = args.max_tokens or 32
    thin_hf = not args.batch_sizes and not torch.cuda.is_available()
    args.batch_sizes = parse_batch_sizes(args.batch_sizes or DEFAULT_BATCHES)
    hf_sizes = args.hf_batch_sizes or (DEFAULT_HF_BATCHES_CPU if thin_hf else None)
    args.hf_batch_sizes = parse_batch_sizes(hf_sizes) if hf_sizes else args.batch_sizes
    args.max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    return args


def kv_cache_bytes(spec: ModelSpec, work: Workload) -> int:
    """Room for every request of the largest batch at full length, with a quarter to spare."""
    per_seq = spec.num_image_tokens + 128 + work.max_tokens
    return int(1.25 * max(work.batch_sizes) * per_seq * kv_bytes_per_token(spec)) + (16 << 20)


def run_worker(module: str, *args: str, env: dict | None = None) -> dict:
    """Run `python -m bench.<module> args...` (in `env`), its log going to our stderr; return its BENCH_RESULT.

    `contention` is the CPU time other processes used meanwhile, as a share of all cores over the wall time:
    near 0 on a quiet machine; above ~0.1 the numbers are disturbed by whatever else runs.
    """
    cmd = [sys.executable, "-m", f"bench.{module}", *args]
    busy0, ours0, t0 = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    env = engine_env(dict(os.environ if env is None else env))   # as bunny-serve runs the engine
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - t0
    foreign = (cpu_busy_seconds() - busy0) - (children_cpu_seconds() - ours0)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"bench.{module} exited with status {proc.returncode}", "stdout_tail": proc.stdout[-2000:]}
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    result["worker_wall_s"] = wall
    result["contention"] = max(0.0, foreign) / (wall * (os.cpu_count() or 1))
    return result


def bench_model(spec: ModelSpec, args, bandwidth: dict, log, baseline=None) -> dict:
    """baseline: (worker environment, commit) of the --baseline revision, or None."""
    path = str(ensure_checkpoint(spec, log=log))
    work = Workload(batch_sizes=args.batch_sizes, max_tokens=args.max_tokens, rounds=args.rounds,
                    prefix_caching=args.prefix_caching, threads=args.threads, cuda_graphs=args.cuda_graphs,
                    distinct_images=args.distinct_images, quantization=args.quantization)
    tp_work = dataclasses.replace(work, tensor_parallel_size=args.tensor_parallel_size)
    hf_work = dataclasses.replace(work, batch_sizes=args.hf_batch_sizes)
    kv = str(kv_cache_bytes(spec, work))
    model = {"name": spec.name, "spec": describe(spec), "checkpoint": path, "workload": work.describe(),
             "hf_batch_sizes": args.hf_batch_sizes, "systems": {}, "wall_s": {}}
    tp = args.tensor_parallel_size
    plan = [("engine", "engine_direct", (path, work.to_json(), kv, spec.dtype), args.skip_engine, None),
            ("engine-tp", "engine_direct", (path, tp_work.to_json(), kv, spec.dtype), args.skip_engine or tp == 1,
             None),
            ("baseline engine", "engine_direct", (path, work.to_json(), kv, spec.dtype),
             args.skip_engine or not baseline, baseline and baseline[0]),
            ("triton", "triton_bench", (path, tp_work.to_json(), kv, spec.dtype), args.skip_triton, None),
            ("transformers", "hf_generate", (path, hf_work.to_json(), spec.dtype), args.skip_hf, None)]
    todo = {name: (module, worker_args, env) for name, module, worker_args, skip, env in plan if not skip}
    order = list(todo)
    if {"engine", "baseline engine"} <= set(todo):   # the before/after pair, alternated
        pair = alternate(args.repeats, ("engine", "baseline engine"))
        order = pair + [n for n in order if n not in pair]
    results: dict[str, list[dict]] = {}
    for name in order:
        module, worker_args, env = todo[name]
        log(f"--- {spec.name}: {name} ---")
        t0 = time.perf_counter()
        result = run_worker(module, *worker_args, env=env)
        model["wall_s"][name] = model["wall_s"].get(name, 0.0) + time.perf_counter() - t0
        if result.get("contention", 0) > 0.1:
            log(f"{name}: other processes took {100 * result['contention']:.0f}% of the CPU meanwhile; "
                "its numbers are disturbed")
        if "error" in result:
            log(f"{name}: {result['error']}")
            model.setdefault("errors", {})[name] = result
            continue
        results.setdefault(name, []).append(result)
    for name, runs in results.items():
        model["systems"][name] = {**median_of(runs), "repeats": len(runs)}
    engine = model["systems"].get("engine", {})
    model["roofline"] = roofline(spec, bandwidth["bytes_per_s"], engine.get("batch1_decode_tok_s"),
                                 bandwidth.get("read", {}).get("bytes_per_s"))
    hf = model["systems"].get("transformers", {})
    if engine.get("first_request_ids") and hf.get("first_request_ids"):
        a, b = engine["first_request_ids"], hf["first_request_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        model["outputs_agree"] = f"{same} of {min(len(a), len(b))} leading tokens equal"
    if args.scenarios:
        t0 = time.perf_counter()
        model["scenarios"] = run_scenarios(spec, path, args, run_worker, log, baseline)
        model["wall_s"]["scenarios"] = time.perf_counter() - t0
    if baseline:
        model["baseline_commit"] = baseline[1]
    model["targets"] = targets(model)
    return model


def _tok(model: dict, system: str, batch: int) -> float | None:
    rows = model["systems"].get(system, {}).get("rows", [])
    return next((r["output_tokens_per_s"] for r in rows if r["batch_size"] == batch), None)


def targets(model: dict) -> dict:
    """The lead's targets, where this run measured what they need (issue #17's on a GPU)."""
    out = {}
    top = max(model["workload"]["batch_sizes"])
    eng, hf, tri = _tok(model, "engine", top), _tok(model, "transformers", top), _tok(model, "triton", top)
    e = model["systems"].get("engine", {})
    gpu = str(e.get("device", "")).startswith("cuda")
    speedup, roof = (3, 0.6) if gpu else (2, 0.7)
    if eng and hf:
        out["engine >= %dx transformers at batch %d" % (speedup, top)] = (eng >= speedup * hf, f"{eng / hf:.2f}x")
    same = _tok(model, "engine-tp", top) or eng   # triton runs at --tensor-parallel-size, like engine-tp
    if same and tri:
        out["triton >= 90%% of engine at batch %d" % top] = (tri >= 0.9 * same, f"{100 * tri / same:.0f}%")
    frac = model["roofline"].get("fraction_of_roofline")
    if frac:
        out["batch-1 decode >= %d%% of roofline" % (100 * roof)] = (frac >= roof, f"{100 * frac:.0f}%")
    base = [(_tok(model, "engine", b), _tok(model, "baseline engine", b)) for b in model["workload"]["batch_sizes"]]
    ratios = [now / before for now, before in base if now and before]
    if ratios:
        out["engine tok/s >= baseline at every batch size"] = (min(ratios) >= 1.0, f"min {min(ratios):.2f}x, "
                                                               f"median {sorted(ratios)[len(ratios) // 2]:.2f}x")
    out.update(scenario_targets(model.get("scenarios", {})))
    read = model["roofline"].get("fraction_of_read_bandwidth")
    if read and not gpu:
        out["batch-1 decode >= 80% of read bandwidth"] = (read >= 0.8, f"{100 * read:.0f}%")
    if "kv_steps_over_need_plus_one" in e:
        out["KV blocks <= live need + 1/seq"] = (e["kv_steps_over_need_plus_one"] == 0,
                                                 f"max excess {e['kv_excess_blocks_per_seq_max']:.2f} blocks/seq")
    return out


PEERS = ("vllm",)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--peer" in argv:                     # ./build.sh bench --peer vllm [bench.peer.run's options]
        i = argv.index("--peer")
        peer = argv[i + 1] if i + 1 < len(argv) else ""
        if peer not in PEERS:
            print(f"--peer takes one of {PEERS}, got {peer!r}", file=sys.stderr)
            return 2
        from bench.peer import run as peer_run
        return peer_run.main(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    cuda = torch.cuda.is_available()
    choice = args.model or ("both" if cuda else "cpu")
    names = ["cpu", "2b"] if choice == "both" else [choice]
    if "2b" in names and not cuda:
        log("the 2b model needs CUDA (bf16, 2.2B parameters); skipping it on this machine")
        names.remove("2b")
    if not names:
        return 2
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    bandwidth = measure_bandwidth("cuda" if cuda else "cpu")
    if not cuda:
        bandwidth["read"] = measure_read_bandwidth("cpu")
    log(f"{machine_name(info)}: copy bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (best of "
        f"{bandwidth['repeats']}), load average {info['loadavg'][0]:.1f}")
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(baseline_env(args.baseline)) if args.baseline else None
        models = [bench_model(SPECS[n], args, bandwidth, log, baseline) for n in names]
    result = {"machine": machine_name(info), "machine_info": info, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "bandwidth": bandwidth, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "models": models, "loadavg_end": list(os.getloadavg()),
              "total_wall_s": time.perf_counter() - t0}
    out = args.out or RESULTS / f"{result['machine']}-{time.strftime('%Y%m%d')}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = report.plot(models, out.with_suffix(".png"), f"bunny bench on {result['machine']} ({result['date']})")
    for m in models:
        print(report.format_model(m))
        print(report.format_targets(m))
    print(f"\nwrote {out}" + (f" and {png}" if png else "") + f" in {result['total_wall_s'] / 60:.1f} min")
    return 1 if any(m.get("errors") for m in models) else 0


if __name__ == "__main__":
    sys.exit(main())
