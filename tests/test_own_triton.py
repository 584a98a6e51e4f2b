"""Deploying into an existing Triton (README "Use your own Triton"): plain `tritonserver --model-repository`,
no bunny-serve, on a copy of the tracked model_repository/bunny/ whose config.pbtxt a user has edited by hand
(model_path set), with the package installed in the server's Python (here: this venv, first on PATH)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bunny_backend.server import tritonserver
from bunny_backend.server.watchdog import model_status
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.tools.reference import ReferenceBunny
from grpc_helpers import TEXTS, inputs_of, send
from model_helpers import expected_prompt_tokens
from server_fixture import free_ports, stop_process, wait_for

pytestmark = pytest.mark.server


def set_parameter(pbtxt: str, key: str, value: str) -> str:
    """What the user does in an editor: change one `parameters` entry's string_value."""
    pattern = re.compile(rf'(key: "{key}"\s+value: {{ string_value: )"[^"]*"')
    assert pattern.search(pbtxt), f"config.pbtxt has no parameter {key}"
    return pattern.sub(lambda m: f'{m.group(1)}"{value}"', pbtxt)


def test_plain_tritonserver_serves_the_tracked_repository(tiny_checkpoint, tmp_path, test_images):
    repo = tmp_path / "models"
    shutil.copytree(tritonserver.MODEL_REPOSITORY / "bunny", repo / "bunny",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    config = repo / "bunny" / "config.pbtxt"
    text = set_parameter(config.read_text(), "model_path", str(Path(tiny_checkpoint).resolve()))
    for key, value in (("device", "cpu"), ("dtype", "float32"), ("kv_cache_memory_bytes", str(8 << 20)), ("num_threads", "2")):
        text = set_parameter(text, key, value)
    config.write_text(text)

    grpc, http, metrics = free_ports(3)
    cmd = [str(tritonserver.tritonserver_binary()), f"--model-repository={repo}",
           f"--backend-directory={tritonserver.ensure_backend_dir()}",   # /opt/tritonserver/backends in NGC images
           "--grpc-address=127.0.0.1", f"--grpc-port={grpc}", "--http-address=127.0.0.1", f"--http-port={http}",
           "--metrics-address=127.0.0.1", f"--metrics-port={metrics}", "--allow-gpu-metrics=false"]
    log = tmp_path / "tritonserver.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=tritonserver.server_env(), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or model_status(f"http://127.0.0.1:{http}", "bunny") == 200, 120,
                 "the model not ready")
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        responses, err = send(f"127.0.0.1:{grpc}", inputs_of(TEXTS[0], [test_images[0]], max_tokens=8))
        assert err is None and len(responses) == 1 and responses[0]["final"]
        r = responses[0]
        assert r["reason"] in ("stop", "length") and r["completion"] == len(r["ids"]) >= 1
        assert r["prompt"] == expected_prompt_tokens(tiny_checkpoint, TEXTS[0], 1)
        # the same ids as the transformers-composed reference on the same weights
        ref, tok = ReferenceBunny.from_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
        assert ref.chat(tok, TEXTS[0], test_images[0], max_new_tokens=8)[0] == r["ids"]
    finally:
        assert stop_process(proc) == 0, log.read_text(errors="replace")[-3000:]
