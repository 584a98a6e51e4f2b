"""`./build.sh bench --peer vllm`: bunny-serve against vLLM CPU's own OpenAI server, on the same weights.

Both serve the `qwen` bench model (the cpu shape with Qwen's real vocabulary; bench/models.py): ours through
Triton gRPC (the perf client's streams), vLLM from .venv-peer as a Qwen2 folder for text requests and a LLaVA
folder for image requests (bunny_backend.tools.export_hf). Same prompt, same square images (a distinct one per
request, so no cache anywhere can reuse an encoded image), same dtype, cores, greedy and `ignore_eos` token counts;
prefix caching off in both. The three servers are up together but only one works at a time: every measurement
alternates between the systems, so the load other processes put on this shared machine falls on both alike and the
ratios hold within one run. Reported: tokens/s per batch size, text and image; TTFT with one image; whether the
greedy ids agree; the CPU share other processes took meanwhile (`contention`).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cpu_busy_seconds, machine_info, machine_name, settle, tree_cpu_seconds
from bench.models import CACHE_DIR, ROOT, SPECS, ensure_checkpoint, kv_bytes_per_token
from bench.peer import openai_stream
from bench.peer.vllm_server import VllmServer
from bench.triton_bench import Server
from bunny_backend.tools import export_hf
from bunny_client.captions import DEFAULT_PROMPT
from bunny_client.grpc_requests import BunnyStream, RequestOptions
from bunny_client.perf import all_at_once
from bunny_client.perf_stats import RequestTiming, parse_batch_sizes, summarize

RESULTS = Path(__file__).resolve().parent.parent / "results"
SETUP = Path(__file__).resolve().parent / "setup_vllm.sh"
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 16
# TTFT with one image is the best of this many tries each, alternated: single requests on this shared machine
# move by 15-40% from one try to the next (159-233 ms for ours in one run).
TTFT_TRIES = 5
KV_CACHE_GIB = 1        # vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE): room for 10 requests of ~300 tokens many times


def square_image(index: int, size: int = 384) -> bytes:
    """A distinct square PNG per index (colour gradients shifted by the index)."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    k = index * 37
    rgb = np.stack([(x + k) * 255 // size, (y + 3 * k) * 255 // size, (x + y + 5 * k) * 127 // size], -1) % 256
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class Images:
    """Hands out images in the same order to every system: request i of the whole run gets image i."""

    def __init__(self):
        self.next = 0

    def take(self, n: int) -> list[bytes]:
        out = [square_image(self.next + i) for i in range(n)]
        self.next += n
        return out


# ---- the two systems behind one interface: round(n, images or None, max_tokens) -------------------------------
class Ours:
    name = "bunny-serve"

    def __init__(self, server: Server, prompt: str):
        self.server, self.prompt, self.conns = server, prompt, []

    def round(self, n: int, images: list[bytes] | None, max_tokens: int):
        while len(self.conns) < n:
            self.conns.append(BunnyStream(self.server.url))

        def one(i: int):
            opts = RequestOptions(text=self.prompt, images=[images[i]] if images else [], max_tokens=max_tokens,
                                  ignore_eos=True, temperature=0.0, stream=True)
            timing, ids = RequestTiming(sent=time.perf_counter()), []
            for delta in self.conns[i].generate(opts):
                timing.record(delta.t, len(delta.ids))
                ids += delta.ids
            return timing, ids

        wall, out = all_at_once([functools.partial(one, i) for i in range(n)])
        done = [r for r in out if isinstance(r, tuple)]
        return wall, [t for t, _ in done], [i for _, i in done], [str(r) for r in out if not isinstance(r, tuple)]

    def close(self) -> None:
        for c in self.conns:
            c.close()


class Vllm:
    name = "vllm"

    def __init__(self, server: VllmServer, prompt: str):
        self.server, self.prompt = server, prompt

    def round(self, n: int, images: list[bytes] | None, max_tokens: int):
        # fresh connections, opened before the clock starts: uvicorn closes a keep-alive connection idle for 5 s
        conns = [openai_stream.ChatConnection("127.0.0.1", self.server.port) for _ in range(n)]
        bodies = [openai_stream.chat_body(self.prompt, images[i] if images else None, max_tokens) for i in range(n)]
        try:
            return openai_stream.run_round(conns, bodies)
        finally:
            for c in conns:
                c.close()

    def close(self) -> None:
        pass


def interleaved(systems: dict[str, dict[str, object]], args, log) -> dict:
    """Every measurement alternates between the systems (their order flipped each repeat), so load from other
    processes falls on both alike: warm-up, TTFT with one image (best of TTFT_TRIES, the order flipped each try),
    then per repeat, kind and batch size one round each. Each round's images are drawn once and given to both
    systems. Every round starts on a quiet machine (bench.common.settle): vLLM's worker keeps a core busy for 1-2 s
    after its last response, which would otherwise slow whichever round comes next."""
    names = list(systems)
    images = Images()
    out = {name: {kind: {"errors": [], "rounds": {}} for kind in ("text", "image")} for name in names}
    for name in names:
        for kind, take in (("text", lambda n: None), ("image", images.take)):
            settle()
            systems[name][kind].round(1, take(1), 8)
    ttfts: dict[str, list[float]] = {name: [] for name in names}
    for i in range(TTFT_TRIES):
        image = images.take(1)
        for name in names if i % 2 == 0 else names[::-1]:
            settle()
            _, timings, _, errs = systems[name]["image"].round(1, image, 1)
            out[name]["image"]["errors"] += errs
            ttfts[name] += [t.ttft for t in timings if t.ttft is not None]
    for name in names:
        t = sorted(ttfts[name])
        out[name]["image"]["ttft_1image_s"] = t[0] if t else None
        out[name]["image"]["ttft_1image_median_s"] = t[len(t) // 2] if t else None
    for rep in range(args.rounds):
        order = names if rep % 2 == 0 else names[::-1]
        for kind in ("text", "image"):
            for n in args.batch_sizes:
                batch_images = images.take(n) if kind == "image" else None
                for name in order:
                    settle()
                    wall, timings, ids, errs = systems[name][kind].round(n, batch_images, args.max_tokens)
                    o = out[name][kind]
                    o["errors"] += errs
                    o["rounds"].setdefault(n, []).append((wall, timings))
                    if rep == 0 and n == args.batch_sizes[0] and ids:   # the same request for both systems
                        o["first_request_ids"] = ids[0]
                    tok = sum(t.tokens for t in timings) / wall
                    log(f"repeat {rep}: {name:11s} {kind:5s} batch {n:2d}: {tok:7.1f} tok/s")
    for name in names:
        for kind in ("text", "image"):
            o = out[name][kind]
            rounds = o.pop("rounds")
            o["rows"] = [summarize(n, rounds[n], 0).as_dict() for n in sorted(rounds)]
            o["errors"] = sorted(set(o["errors"]))
    return out


class Phase:
    """Wall time and the CPU share other processes took meanwhile (0: a quiet machine)."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.t0, self.busy0 = time.perf_counter(), cpu_busy_seconds()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return sum(tree_cpu_seconds(p) for p in self.pids) + r.ru_utime + r.ru_stime

    def end(self) -> dict:
        wall = time.perf_counter() - self.t0
        ours = self._ours() - self.ours0
        foreign = cpu_busy_seconds() - self.busy0 - ours
        return {"wall_s": wall, "contention": max(0.0, foreign) / (wall * (os.cpu_count() or 1)),
                "servers_and_client_cpu_s": ours}


def our_server(path: Path, args) -> Server:
    spec = SPECS["qwen"]
    per_seq = spec.num_image_tokens + 128 + args.max_tokens
    kv = int(1.25 * max(args.batch_sizes) * per_seq * kv_bytes_per_token(spec)) + (16 << 20)
    params = {"kv_cache_memory_bytes": str(kv), "max_num_seqs": str(MAX_NUM_SEQS), "enable_prefix_caching": "false",
              "num_threads": str(args.threads), "max_model_len": str(MAX_MODEL_LEN), "quantization": args.quantization}
    return Server(str(path), params, args.dtype)


def vllm_server(folder: Path, image: bool, args) -> VllmServer:
    return VllmServer(folder, args.dtype, args.threads, MAX_NUM_SEQS, MAX_MODEL_LEN, KV_CACHE_GIB, image)


def exported(src: Path) -> tuple[Path, Path]:
    """The Qwen2 and LLaVA folders of the bench checkpoint, rebuilt when the checkpoint or the exporter changed."""
    base = CACHE_DIR / "peer" / src.name
    qwen2, llava = base / "qwen2", base / "llava"
    want = f"{(src / 'config.json').stat().st_mtime} {hashlib.sha256(Path(export_hf.__file__).read_bytes()).hexdigest()}"
    for folder, export in ((qwen2, export_hf.export_qwen2), (llava, export_hf.export_llava)):
        stamp = folder / "bench-export-stamp"
        if not stamp.is_file() or stamp.read_text() != want:
            export(src, folder)
            stamp.write_text(want)
    return qwen2, llava


def _tok(result: dict, batch: int) -> float | None:
    return next((r["output_tokens_per_s"] for r in result.get("rows", []) if r["batch_size"] == batch), None)


def agreement(a: list[int] | None, b: list[int] | None) -> str:
    if not a or not b:
        return "not measured"
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same} of {min(len(a), len(b))} leading tokens equal"


def targets(ours: dict, vllm: dict, batch_sizes: list[int]) -> dict:
    out = {}
    for kind in ("text", "image"):
        for b in (1, 10):
            if b not in batch_sizes:
                continue
            x, y = _tok(ours.get(kind, {}), b), _tok(vllm.get(kind, {}), b)
            if x and y:
                out[f"bunny-serve >= 1.2x vLLM, {kind}, batch {b}"] = (x >= 1.2 * y, f"{x / y:.2f}x")
    a, b = ours.get("image", {}).get("ttft_1image_s"), vllm.get("image", {}).get("ttft_1image_s")
    if a and b:
        out["TTFT with one image <= vLLM's"] = (a <= b, f"{1e3 * a:.0f} vs {1e3 * b:.0f} ms")
    return out


# Issue #30 compares our int8 with vLLM CPU's bf16: its CPU build runs int8 only from a checkpoint quantized
# beforehand (compressed-tensors), not from a bf16 one at load, so its row stays in --dtype, labelled.
VLLM_UNQUANTIZED = ("vLLM runs unquantized: its CPU build cannot quantize a bf16/fp32 checkpoint at load (int8 there "
                    "needs a pre-quantized compressed-tensors checkpoint); bunny-serve runs quantization {q}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./build.sh bench --peer vllm", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,4,10")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="repeats of every measurement (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="cores for each server (default: all)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--quantization", choices=("none", "int8", "w8a8"), default="none",
                   help="bunny-serve's weights quantized at load; vLLM runs --dtype unquantized (see VLLM_UNQUANTIZED)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.batch_sizes = parse_batch_sizes(args.batch_sizes)
    args.threads = args.threads or os.cpu_count() or 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    subprocess.run(["bash", str(SETUP)], check=True, cwd=ROOT)
    t0 = time.perf_counter()
    info = machine_info()
    path = ensure_checkpoint(SPECS["qwen"], log=log)
    qwen2, llava = exported(path)
    log(f"{machine_name(info)} ({info.get('cpu_model')}, {info.get('cpu_features', {}).get('isa')}), "
        f"load average {info['loadavg'][0]:.1f}")
    result = {"machine": machine_name(info), "machine_info": info, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "model": {"checkpoint": str(path), "qwen2": str(qwen2), "llava": str(llava)}, "systems": {},
              "quantization": {"bunny-serve": args.quantization, "vllm": "none"}}
    if args.quantization != "none":
        log(VLLM_UNQUANTIZED.format(q=args.quantization))
        result["quantization"]["note"] = VLLM_UNQUANTIZED.format(q=args.quantization)
    servers, systems = [], {}
    try:
        log("starting bunny-serve, and vLLM on the Qwen2 and the LLaVA folders (idle while the other measures)")
        t = time.perf_counter()
        ours = our_server(path, args)
        servers.append(ours)
        systems["bunny-serve"] = {"text": Ours(ours, args.prompt), "image": Ours(ours, args.prompt)}
        startup = {"bunny-serve": time.perf_counter() - t}
        t = time.perf_counter()
        text, image = vllm_server(qwen2, False, args), None
        servers.append(text)
        image = vllm_server(llava, True, args)
        servers.append(image)
        systems["vllm"] = {"text": Vllm(text, args.prompt), "image": Vllm(image, args.prompt)}
        startup["vllm (both)"] = time.perf_counter() - t
        phase = Phase([s.proc.pid for s in servers])
        result["systems"] = interleaved(systems, args, log)
        result.update(phase.end(), startup_s=startup, vllm_commands=[text.cmd, image.cmd],
                      our_server_log=ours.log.name)
    finally:
        for pair in systems.values():
            for system in pair.values():
                system.close()
        for server in servers:
            server.stop()
    ours, vllm = result["systems"].get("bunny-serve", {}), result["systems"].get("vllm", {})
    result["greedy_ids"] = {k: agreement(ours.get(k, {}).get("first_request_ids"), vllm.get(k, {}).get("first_request_ids"))
                            for k in ("text", "image")}
    result["targets"] = targets(ours, vllm, args.batch_sizes)
    result["loadavg_end"] = list(os.getloadavg())
    result["total_wall_s"] = time.perf_counter() - t0
    out = args.out or RESULTS / f"peer-vllm-{result['machine']}-{time.strftime('%Y%m%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_result(result, args.batch_sizes))
    print(f"\nwrote {out} in {result['total_wall_s'] / 60:.1f} min")
    return 0


def format_result(result: dict, batch_sizes: list[int]) -> str:
    ours, vllm = result["systems"].get("bunny-serve", {}), result["systems"].get("vllm", {})
    lines = [f"{result['machine']} ({result['machine_info'].get('cpu_model')}), dtype {result['args']['dtype']}, "
             f"{result['args']['max_tokens']} new tokens", "| kind | batch | bunny-serve tok/s | vLLM tok/s | ratio |",
             "|---|---|---|---|---|"]
    for kind in ("text", "image"):
        for b in batch_sizes:
            x, y = _tok(ours.get(kind, {}), b), _tok(vllm.get(kind, {}), b)
            ratio = f"{x / y:.2f}" if x and y else "-"
            lines.append(f"| {kind} | {b} | {x or 0:.1f} | {y or 0:.1f} | {ratio} |")
    a, b = ours.get("image", {}).get("ttft_1image_s"), vllm.get("image", {}).get("ttft_1image_s")
    lines.append(f"TTFT with one image (best of {TTFT_TRIES}): bunny-serve {1e3 * (a or 0):.0f} ms, "
                 f"vLLM {1e3 * (b or 0):.0f} ms")
    lines.append(f"greedy ids: {result['greedy_ids']}")
    if result.get("contention") is not None:
        lines.append(f"contention (other processes' share of the CPU meanwhile): {100 * result['contention']:.0f}%")
    for name, (met, value) in result["targets"].items():
        lines.append(f"  [{'met' if met else 'NOT met'}] {name}: {value}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
