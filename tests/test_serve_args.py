"""bunny-serve's command line: loopback by default, --address and --server-arg reach tritonserver; stops are bounded."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from bunny_backend.server import cli, tritonserver


def command(*argv) -> list[str]:
    args = cli.parse_args(["--model-path", "/m", *argv])
    ports = tritonserver.Ports(args.grpc_port, args.http_port, args.metrics_port, args.address)
    return tritonserver.server_command(Path("/repo"), ports, extra_args=tuple(args.server_arg))


def test_every_endpoint_binds_loopback_by_default():
    cmd = command()
    assert {a for a in cmd if a.split("=")[0].endswith("-address")} == {
        "--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"}


def test_address_and_server_args_are_passed_on():
    cmd = command("--address", "0.0.0.0", "--server-arg=--grpc-use-ssl=true", "--server-arg=--grpc-server-cert=c.pem")
    assert "--grpc-address=0.0.0.0" in cmd and "--http-address=0.0.0.0" in cmd
    assert cmd[-2:] == ["--grpc-use-ssl=true", "--grpc-server-cert=c.pem"]


def test_the_engine_processes_get_huge_pages_unless_told_otherwise():
    """torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: it has to be in the stub's environment."""
    assert tritonserver.server_env({"PATH": "/usr/bin"})["THP_MEM_ALLOC_ENABLE"] == "1"
    env = tritonserver.server_env({"PATH": "/usr/bin", "THP_MEM_ALLOC_ENABLE": "0", "OMP_WAIT_POLICY": "PASSIVE"})
    assert (env["THP_MEM_ALLOC_ENABLE"], env["OMP_WAIT_POLICY"]) == ("0", "PASSIVE")   # the user's own stand


def test_probes_reach_a_wildcard_address_on_loopback():
    assert tritonserver.Ports(http=9).http_url == "http://127.0.0.1:9"
    assert tritonserver.Ports(http=9, address="0.0.0.0").http_url == "http://127.0.0.1:9"
    assert tritonserver.Ports(http=9, address="10.1.2.3").http_url == "http://10.1.2.3:9"
    assert tritonserver.Ports(http=9, address="::").http_url == "http://[::1]:9"


def test_a_stop_that_outlives_its_deadline_is_killed():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    t0 = time.monotonic()
    assert cli.wait_or_kill(proc, [time.monotonic() + 1.0]) == -signal.SIGKILL
    assert time.monotonic() - t0 < 10


def test_ready_waits_for_the_metrics_endpoint_too():
    """Triton opens its metrics port last: READY must not be printed before it accepts connections."""
    import http.server
    import socket
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http_server = http.server.HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    metrics = socket.socket()
    metrics.bind(("127.0.0.1", 0))
    try:
        ports = tritonserver.Ports(http=http_server.server_address[1], metrics=metrics.getsockname()[1])
        assert not cli.model_ready(ports)   # bound but not listening yet: refused
        metrics.listen()
        assert cli.model_ready(ports)
    finally:
        http_server.shutdown()
        metrics.close()


def test_scale_out_flags_reach_the_generated_config(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    args = cli.parse_args(["--model-path", "/m", "--tensor-parallel-size", "2", "--instances", "3"])
    params = cli.write_repository(tritonserver.MODEL_REPOSITORY, tmp_path / "repo", cli.overrides(args), args.instances)
    assert params["tensor_parallel_size"] == "2"
    text = (tmp_path / "repo" / "bunny" / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [g.count for g in config.instance_group] == [3]


def test_bad_scale_out_flags_are_refused(tmp_path):
    for argv, message in ((["--tensor-parallel-size", "0"], "tensor_parallel_size must be >= 1"),
                          (["--instances", "0"], "--instances must be >= 1")):
        args = cli.parse_args(["--model-path", "/m", *argv])
        with pytest.raises(ValueError, match=message):
            cli.write_repository(tritonserver.MODEL_REPOSITORY, tmp_path / argv[0], cli.overrides(args), args.instances)


def test_the_openai_flags_reach_the_front(monkeypatch):
    from bunny_backend.server.openai import runner
    from bunny_backend.server.openai.options import FrontOptions

    seen = []

    class Front:
        def __init__(self, address, port, options):
            seen.append((address, port, options))

        def stop(self):
            pass

    monkeypatch.setattr(runner, "OpenAIFront", Front)
    monkeypatch.setattr(cli, "serve_triton", lambda args: 0)
    args = cli.parse_args(["--model-path", "/m", "--grpc-port", "8101", "--openai-port", "9001",
                           "--served-model-name", "a", "b", "--allowed-media-domains", "Images.Example.org",
                           "--max-request-bytes", "4096", "--media-timeout-s", "2.5"])
    assert cli.serve(args) == 0
    assert seen == [("127.0.0.1", 9001, FrontOptions("127.0.0.1:8101", "bunny", ("a", "b"),
                                                     allowed_media_domains=("images.example.org",),
                                                     max_request_bytes=4096, media_timeout_s=2.5))]
