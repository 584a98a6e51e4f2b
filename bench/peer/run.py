"""`./build.sh bench --peer vllm`: bunny-serve against vLLM CPU's own OpenAI server, on the same weights.

Both serve the `qwen` bench model (the cpu shape with Qwen's real vocabulary; bench/models.py): ours through
Triton gRPC (the perf client's streams), vLLM from .venv-peer as a Qwen2 folder for text requests and a LLaVA
folder for image requests (bunny_backend.tools.export_hf). Same prompt, same square images (a distinct one per
request, so no cache anywhere can reuse an encoded image), same dtype, cores, greedy and `ignore_eos` token counts;
prefix caching off in both. One server runs at a time. Reported: tokens/s per batch size, text and image; TTFT with
one image; whether the greedy ids agree; the CPU time other processes took meanwhile (`contention`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import cpu_busy_seconds, machine_info, machine_name, tree_cpu_seconds
from bench.models import CACHE_DIR, ROOT, SPECS, ensure_checkpoint, kv_bytes_per_token
from bench.peer import openai_stream
from bench.peer.vllm_server import VllmServer
from bench.triton_bench import Server
from bunny_backend.tools.export_hf import export_llava, export_qwen2
from bunny_client.captions import DEFAULT_PROMPT
from bunny_client.grpc_requests import BunnyStream, RequestOptions
from bunny_client.perf_stats import RequestTiming, parse_batch_sizes, summarize

RESULTS = Path(__file__).resolve().parent.parent / "results"
SETUP = Path(__file__).resolve().parent / "setup_vllm.sh"
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 16


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
        out: list = [None] * n
        start = threading.Barrier(n + 1)

        def one(i: int) -> None:
            opts = RequestOptions(text=self.prompt, images=[images[i]] if images else [], max_tokens=max_tokens,
                                  ignore_eos=True, temperature=0.0, stream=True)
            start.wait()
            timing, ids = RequestTiming(sent=time.perf_counter(), first=None, last=None, tokens=0), []
            try:
                for delta in self.conns[i].generate(opts):
                    if delta.ids:
                        timing.first = delta.t if timing.first is None else timing.first
                        timing.last = delta.t
                        timing.tokens += len(delta.ids)
                        ids += delta.ids
                out[i] = (timing, ids)
            except Exception as e:   # noqa: BLE001
                out[i] = e

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done = [r for r in out if isinstance(r, tuple)]
        return wall, [t for t, _ in done], [i for _, i in done], [str(r) for r in out if not isinstance(r, tuple)]

    def close(self) -> None:
        for c in self.conns:
            c.close()


class Vllm:
    name = "vllm"

    def __init__(self, server: VllmServer, prompt: str):
        self.server, self.prompt, self.conns = server, prompt, []

    def round(self, n: int, images: list[bytes] | None, max_tokens: int):
        while len(self.conns) < n:
            self.conns.append(openai_stream.ChatConnection("127.0.0.1", self.server.port))
        bodies = [openai_stream.chat_body(self.prompt, images[i] if images else None, max_tokens) for i in range(n)]
        return openai_stream.run_round(self.conns[:n], bodies)

    def close(self) -> None:
        for c in self.conns:
            c.close()


def sweep(system, args, images: Images | None, log) -> dict:
    """Warm-up, TTFT with one image (image runs), then each batch size: the rows, first ids and any errors."""
    kind = "image" if images else "text"
    take = (lambda n: images.take(n)) if images else (lambda n: None)
    errors: list[str] = []
    system.round(1, take(1), 8)
    out: dict = {}
    if images:
        ttfts = []
        for _ in range(3):
            _, timings, _, errs = system.round(1, take(1), 1)
            errors += errs
            ttfts += [t.ttft for t in timings if t.ttft is not None]
        ttfts.sort()
        out["ttft_1image_s"], out["ttft_1image_median_s"] = (ttfts[0], ttfts[len(ttfts) // 2]) if ttfts else (None, None)
    rows, first_ids = [], None
    for n in args.batch_sizes:
        results = []
        for _ in range(args.rounds):
            wall, timings, ids, errs = system.round(n, take(n), args.max_tokens)
            errors += errs
            results.append((wall, timings))
            if first_ids is None and n == min(args.batch_sizes) and ids:
                first_ids = ids[0]
        rows.append(summarize(n, results, len(errors)).as_dict())
        r = rows[-1]
        log(f"{system.name:11s} {kind:5s} batch {n:2d}: {r['output_tokens_per_s']:7.1f} tok/s  "
            f"TTFT {r['ttft_mean_ms']:7.0f} ms  ITL {r['itl_mean_ms']:6.1f} ms")
    out.update(rows=rows, first_request_ids=first_ids, errors=sorted(set(errors)))
    return out


class Phase:
    """Wall time and the CPU share other processes took while one server ran (0: a quiet machine)."""

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.t0, self.busy0 = time.perf_counter(), cpu_busy_seconds()
        self.ours0 = tree_cpu_seconds(server_pid) + self._self_cpu()

    @staticmethod
    def _self_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def end(self) -> dict:
        wall = time.perf_counter() - self.t0
        ours = tree_cpu_seconds(self.pid) + self._self_cpu() - self.ours0
        foreign = cpu_busy_seconds() - self.busy0 - ours
        return {"wall_s": wall, "contention": max(0.0, foreign) / (wall * (os.cpu_count() or 1)),
                "server_and_client_cpu_s": ours}


def run_ours(path: Path, args, log) -> dict:
    spec = SPECS["qwen"]
    per_seq = spec.num_image_tokens + 128 + args.max_tokens
    kv = int(1.25 * max(args.batch_sizes) * per_seq * kv_bytes_per_token(spec)) + (16 << 20)
    params = {"kv_cache_memory_bytes": str(kv), "max_num_seqs": str(MAX_NUM_SEQS), "enable_prefix_caching": "false",
              "num_threads": str(args.threads), "max_model_len": str(MAX_MODEL_LEN)}
    server = Server(str(path), params, args.dtype)
    phase = Phase(server.proc.pid)
    system = Ours(server, args.prompt)
    try:
        result = {"text": sweep(system, args, None, log), "image": sweep(system, args, Images(), log)}
    finally:
        system.close()
        result_phase = phase.end()
        server.stop()
    return {**result, **result_phase, "server_params": params}


def run_vllm(folder: Path, image: bool, args, log) -> dict:
    kv_gib = 1
    t0 = time.perf_counter()
    server = VllmServer(folder, args.dtype, args.threads, MAX_NUM_SEQS, MAX_MODEL_LEN, kv_gib, image)
    startup = time.perf_counter() - t0
    phase = Phase(server.proc.pid)
    system = Vllm(server, args.prompt)
    try:
        result = sweep(system, args, Images() if image else None, log)
    finally:
        system.close()
        result_phase = phase.end()
        server.stop()
    return {**result, **result_phase, "startup_s": startup, "command": server.cmd, "kv_cache_gib": kv_gib}


def exported(src: Path) -> tuple[Path, Path]:
    """The Qwen2 and LLaVA folders of the bench checkpoint (rebuilt when the checkpoint is newer)."""
    base = CACHE_DIR / "peer" / src.name
    qwen2, llava = base / "qwen2", base / "llava"
    stamp = (src / "config.json").stat().st_mtime
    for folder, export in ((qwen2, export_qwen2), (llava, export_llava)):
        if not (folder / "config.json").is_file() or (folder / "config.json").stat().st_mtime < stamp:
            export(src, folder)
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./build.sh bench --peer vllm", description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,4,10")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=0, help="cores for each server (default: all)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
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
              "model": {"checkpoint": str(path), "qwen2": str(qwen2), "llava": str(llava)}, "systems": {}}
    if not args.skip_ours:
        log("--- bunny-serve (Triton gRPC) ---")
        result["systems"]["bunny-serve"] = run_ours(path, args, log)
    if not args.skip_vllm:
        log("--- vLLM CPU, text (Qwen2 folder) ---")
        text = run_vllm(qwen2, False, args, log)
        log("--- vLLM CPU, image (LLaVA folder) ---")
        image = run_vllm(llava, True, args, log)
        result["systems"]["vllm"] = {"text": text, "image": image}
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
    lines.append(f"TTFT with one image (best of 3): bunny-serve {1e3 * (a or 0):.0f} ms, vLLM {1e3 * (b or 0):.0f} ms")
    lines.append(f"greedy ids: {result['greedy_ids']}")
    cont = {"bunny-serve": ours.get("contention"), "vllm text": vllm.get("text", {}).get("contention"),
            "vllm image": vllm.get("image", {}).get("contention")}
    lines.append("contention: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in cont.items() if v is not None))
    for name, (met, value) in result["targets"].items():
        lines.append(f"  [{'met' if met else 'NOT met'}] {name}: {value}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
