"""`bunny-client perf --perf-analyzer`: Triton's own perf_analyzer over the same request.

perf_analyzer ships inside the tritonclient wheel (`.venv/bin/perf_analyzer`). It links two shared libraries
that the wheel does not bring: `libb64.so.0d` (Debian: `apt-get install libb64-0d`) and `libcudart.so.12`
(PyPI: `nvidia-cuda-runtime-cu12`, found here under site-packages/nvidia/cuda_runtime/lib and put on
LD_LIBRARY_PATH; no GPU is needed to run it over gRPC).
The image travels as base64 of the serialized BYTES tensor (4-byte little-endian length + the file).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from .grpc_requests import MODEL_NAME


class PerfAnalyzerMissing(RuntimeError):
    pass


def find_binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    if found.is_file():
        return found
    which = shutil.which("perf_analyzer")
    if which:
        return Path(which)
    raise PerfAnalyzerMissing("perf_analyzer not found (it ships with tritonclient: pip install 'tritonclient[all]')")


def cudart_dirs() -> list[str]:
    """Folders holding libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel, if installed."""
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    dirs = [Path(p) / "lib" for p in (spec.submodule_search_locations or [])] if spec else []
    return [str(d) for d in dirs if (d / "libcudart.so.12").exists()]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    extra = cudart_dirs()
    if extra:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env


def check_libraries(binary: Path, env: dict[str, str]) -> None:
    """Raise PerfAnalyzerMissing naming the package for each shared library the loader cannot find."""
    if not shutil.which("ldd"):
        return
    out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    hints = {"libb64.so.0d": "apt-get install libb64-0d", "libcudart.so.12": "pip install nvidia-cuda-runtime-cu12"}
    if missing:
        fixes = "; ".join(f"{lib}: {hints.get(lib, 'install it')}" for lib in missing)
        raise PerfAnalyzerMissing(f"perf_analyzer cannot load its libraries ({fixes})")


def serialize_bytes(*items: bytes) -> bytes:
    """Triton's raw BYTES tensor layout: each element as uint32 little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def input_data(text: str, image: bytes | None, max_tokens: int) -> dict:
    """perf_analyzer --input-data JSON: one request with the prompt, the image, and the benchmark options."""
    step = {
        "text_input": {"content": [text], "shape": [1]},
        "max_tokens": {"content": [max_tokens], "shape": [1]},
        "ignore_eos": {"content": [True], "shape": [1]},
        "stream": {"content": [True], "shape": [1]},
    }
    if image:
        step["image"] = {"content": {"b64": base64.b64encode(serialize_bytes(image)).decode()}, "shape": [1]}
    return {"data": [step]}


def command(binary: Path, url: str, data_file: Path, out_dir: Path, max_concurrency: int,
            request_count: int, extra: list[str]) -> list[str]:
    return [
        str(binary), "-m", MODEL_NAME, "-u", url, "-i", "grpc", "--streaming",
        "--input-data", str(data_file),
        "--concurrency-range", f"1:{max_concurrency}:1",
        "--measurement-mode", "count_windows", "--measurement-request-count", str(request_count),
        "--max-trials", "3", "--stability-percentage", "999",
        "-f", str(out_dir / "perf_analyzer.csv"),
        "--profile-export-file", str(out_dir / "perf_analyzer_profile.json"),
        *extra,
    ]


def run_perf_analyzer(url: str, text: str, image: bytes | None, max_tokens: int, max_concurrency: int,
                      out_dir: Path, request_count: int = 4, extra: list[str] | None = None,
                      timeout_s: float | None = None) -> Path:
    """Run the sweep 1..max_concurrency; its stdout goes to out_dir/perf_analyzer.txt. Returns that path."""
    binary = find_binary()
    env = environment()
    check_libraries(binary, env)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / "perf_analyzer_input.json"
    data_file.write_text(json.dumps(input_data(text, image, max_tokens)))
    cmd = command(binary, url, data_file, out_dir, max_concurrency, request_count, extra or [])
    log = out_dir / "perf_analyzer.txt"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    log.write_text(f"$ {' '.join(cmd)}\n\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"perf_analyzer exited with {proc.returncode}: {tail[0]} (see {log})")
    return log
