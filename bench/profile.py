"""Where engine decode time goes: torch.profiler over decode steps at batch 1 and 10, top ops by self CPU time.

    python -m bench.profile [--model cpu|2b] [--dtype D] [--batch-sizes 1,10] [--steps 24] [--rows 20] [--trace DIR]

The engine's phases (schedule, prepare inputs, model forward, lm_head, sampler, postprocess, detokenize) are
wrapped in `record_function` labels, so the table shows them beside the aten ops; the gap between the steps' wall
time and the ops' total is the Python around them.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import Workload
from bench.engine_direct import make_engine
from bench.models import SPECS, ensure_checkpoint
from bench.run import kv_cache_bytes
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_client.perf_stats import parse_batch_sizes


def label(obj, attr: str, name: str) -> None:
    """Wrap obj.attr (a bound method) in record_function(name)."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with record_function(name):
            return fn(*a, **kw)

    setattr(obj, attr, wrapped)


def instrument(engine) -> None:
    label(engine.scheduler, "schedule", "## schedule")
    label(engine.scheduler, "postprocess", "## postprocess")
    label(engine.runner, "_prepare", "## prepare inputs")
    label(engine.runner, "sampler", "## sampler")
    label(engine.model, "forward", "## model.forward (decoder)")
    label(engine.model, "compute_logits", "## lm_head")
    label(engine.model, "embed_inputs", "## embed")
    label(engine, "_on_token", "## detokenize+outputs")


def into_decode(engine, work: Workload, n: int, max_tokens: int) -> None:
    """Add n requests and step until every one has its first token (prefill done)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"p{n}-{i}", work.prompt, [work.image], params)
    started = set()
    while len(started) < n:
        started |= {o.request_id for o in engine.step() if o.delta_token_ids}


def profile_batch(engine, work: Workload, n: int, steps: int, rows: int, trace_dir: str | None) -> None:
    into_decode(engine, work, n, max_tokens=steps + 16)
    for _ in range(3):                                   # warm
        engine.step()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else []),
                 record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function("## step"):
                engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    events = prof.key_averages()
    ops_self = sum(e.self_cpu_time_total for e in events if not e.key.startswith("##")) / 1e3
    print(f"\n=== batch {n}: {steps} decode steps, {1000 * wall / steps:.1f} ms/step (profiled), "
          f"{n * steps / wall:.1f} tok/s; aten ops' self CPU {ops_self / steps:.1f} ms/step, "
          f"{100 * ops_self / (1000 * wall):.0f}% of wall")
    sort = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=48))
    phases = sorted((e for e in events if e.key.startswith("##")), key=lambda e: -e.cpu_time_total)
    print("phases (inclusive CPU time per step):")
    for e in phases:
        print(f"  {e.key[3:]:<28} {e.cpu_time_total / 1e3 / steps:8.2f} ms  ({e.count // steps} call(s)/step)")
    if trace_dir:
        path = f"{trace_dir}/decode-b{n}.json"
        prof.export_chrome_trace(path)
        print(f"chrome trace: {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default="cpu")
    p.add_argument("--batch-sizes", default="1,10")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", help="the engine's dtype (default: the bench model's own)")
    p.add_argument("--trace", help="folder for chrome traces (one per batch size)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="decode eagerly on CUDA (graphs are the default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SPECS[args.model]
    sizes = parse_batch_sizes(args.batch_sizes)
    work = Workload(batch_sizes=sizes, max_tokens=args.steps + 16, cuda_graphs=args.cuda_graphs)
    engine = make_engine(str(ensure_checkpoint(spec)), work, kv_cache_bytes(spec, work), args.dtype or spec.dtype)
    instrument(engine)
    print(f"{spec.name} model, {engine.device}, {engine.dtype}, {torch.get_num_threads()} threads, "
          f"decode graphs {'on' if engine.runner.graphs is not None else 'off'}")
    for n in sizes:
        profile_batch(engine, work, n, args.steps, args.rows, args.trace)


if __name__ == "__main__":
    main()
