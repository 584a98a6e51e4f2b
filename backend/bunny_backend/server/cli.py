"""`bunny-serve`: run the real tritonserver on a generated copy of model_repository/ in the foreground.

The copy (a temporary folder) carries config.pbtxt with the engine parameters overridden by the command line
(--model-path, --device, --dtype, --quantization, --tensor-parallel-size, --param KEY=VALUE) and the instance count (--instances);
the tracked config.pbtxt is never edited. Every endpoint
binds 127.0.0.1 unless --address says otherwise. `READY` is printed on its own line on stdout once the model
takes requests; the server's log goes to stderr. SIGTERM/SIGINT stop the server cleanly. Exit status: 0 after a clean stop, 2 for bad
arguments, 1 when the model fails to load (its error lines are repeated at the end) or when its Python stub
process dies while serving (server/watchdog.py: the model is unloaded and tritonserver stopped). A stop that
outlives --exit-timeout by STOP_KILL_GRACE_S (a client holding a stream open keeps Triton 2.51's gRPC server
from shutting down) ends with SIGKILL.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bunny_backend.config import EngineConfig
from bunny_backend.server import tritonserver, watchdog
from bunny_backend.server.launch import die_with_parent
from bunny_backend.server.openai.options import add_shared_arguments, from_args

MODEL_NAME = "bunny"
STOP_KILL_GRACE_S = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bunny-serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, type=Path, help="a checkpoint folder (docs/api/triton-model.md)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), help="engine device (config default: auto)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--quantization", choices=("none", "int8", "w8a8", "fp8"),
                   help="weights quantized at load (config default: none): int8 (or w8a8: 8-bit activations too, "
                        "faster, less accurate) on the CPU, fp8 on CUDA >= 8.9")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N",
                   help="shard the model over N devices (processes) with torch.distributed (config default: 1)")
    p.add_argument("--instances", type=int, metavar="N",
                   help="run N independent engines (Triton instances) that share the requests (config default: 1)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int,
                   help="also serve the OpenAI-compatible API (/v1/chat/completions) on this port (default: off)")
    add_shared_arguments(p.add_argument_group("the OpenAI API's options (with --openai-port)"))
    p.add_argument("--address", default="127.0.0.1",
                   help="address every endpoint binds (default 127.0.0.1; 0.0.0.0 exposes the server)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to tritonserver (repeatable), e.g. --server-arg=--grpc-use-ssl=true")
    p.add_argument("--repository", type=Path, default=tritonserver.MODEL_REPOSITORY,
                   help="model repository to copy (default: the checkout's model_repository/)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override an engine parameter of config.pbtxt (repeatable), e.g. max_num_seqs=8")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for the model to load")
    p.add_argument("--exit-timeout", type=int, default=20,
                   help="seconds tritonserver waits for in-flight requests and the unload on SIGTERM")
    p.add_argument("--log-verbose", type=int, default=0)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """The parameters to write; raises ValueError with a readable message."""
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param takes KEY=VALUE, got {item!r}")
        params[key.strip()] = value.strip()
    params["model_path"] = str(args.model_path.resolve())
    if args.device:
        params["device"] = args.device
    if args.dtype:
        params["dtype"] = args.dtype
    if args.quantization:
        params["quantization"] = args.quantization
    if args.tensor_parallel_size is not None:
        params["tensor_parallel_size"] = str(args.tensor_parallel_size)
    return params


def write_repository(src: Path, dst: Path, params: dict[str, str], instances: int | None = None) -> dict[str, str]:
    """Copy `src` to `dst` with bunny's parameters (and instance count) overridden; returns the resulting
    parameters (validated)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    path = dst / MODEL_NAME / "config.pbtxt"
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    for key, value in params.items():
        config.parameters[key].string_value = value
    if instances is not None:
        if instances < 1:
            raise ValueError(f"--instances must be >= 1, got {instances}")
        if len(config.instance_group) != 1:
            raise ValueError(f"--instances needs exactly one instance_group in {path}, it has "
                             f"{len(config.instance_group)}")
        config.instance_group[0].count = instances
    merged = {k: v.string_value for k, v in config.parameters.items()}
    EngineConfig.from_parameters(merged)   # unknown keys, bad values: fail here, not inside the server
    path.write_text(text_format.MessageToString(config))
    return merged


def model_ready(ports: tritonserver.Ports) -> bool:
    """The model takes requests and the metrics endpoint (Triton starts it last) accepts connections."""
    if watchdog.model_status(ports.http_url, MODEL_NAME) != 200:
        return False
    try:
        socket.create_connection((ports.probe_host, ports.metrics), timeout=2).close()
        return True
    except OSError:
        return False


def _pump(stream, tail: collections.deque) -> None:
    """Forward the server's log to stderr, remembering its last lines."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line.rstrip("\n"))


def error_lines(tail) -> list[str]:
    """The model's load error (unescaped) if the log has one, else the server's error lines."""
    for line in tail:
        m = re.search(r"failed to load '[^']+' version \d+: (.*?)\"?$", line)
        if m:
            return m.group(1).replace("\\n", "\n").rstrip().splitlines()
    lines = [l for l in tail if l[:1] == "E" and "CudaDriverHelper" not in l or l.startswith("error:")]
    return lines[-20:] or list(tail)[-20:]


def watch_stubs(proc: subprocess.Popen, http_url: str, stopping: threading.Event) -> bool:
    """Until tritonserver exits or a clean stop begins, check its stub processes; True if one died (the server
    has then been stopped)."""
    stub_watch = watchdog.StubWatchdog(proc.pid, http_url, MODEL_NAME)
    while proc.poll() is None and not stopping.is_set():
        pid = stub_watch.dead_stub()
        # A clean stop unloads the model, so its stub exits too; a dead tritonserver orphans its stubs.
        if pid is not None and not stopping.is_set() and proc.poll() is None:
            watchdog.stop_after_stub_death(proc, pid, http_url, MODEL_NAME)
            return True
        time.sleep(watchdog.POLL_S)
    return False


def wait_or_kill(proc: subprocess.Popen, stop_deadline: list[float]) -> int:
    """Wait for tritonserver; once a stop was asked for, SIGKILL it at stop_deadline[0]."""
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if time.monotonic() > stop_deadline[0]:
                print("bunny-serve: tritonserver did not exit after its exit timeout (a client still holds a "
                      "stream open); killing it", file=sys.stderr, flush=True)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return proc.wait()


def serve(args: argparse.Namespace) -> int:
    """Triton, and the OpenAI front beside it when --openai-port is given (bound first, stopped last)."""
    front = None
    if args.openai_port is not None:
        from bunny_backend.server.openai.runner import OpenAIFront
        host = tritonserver.Ports(address=args.address).probe_host
        grpc_url = f"[{host}]:{args.grpc_port}" if ":" in host else f"{host}:{args.grpc_port}"
        try:
            options = from_args(args, triton_url=grpc_url, model=MODEL_NAME)
        except ValueError as e:
            print(f"bunny-serve: {e}", file=sys.stderr)
            return 2
        try:
            front = OpenAIFront(args.address, args.openai_port, options)
        except OSError as e:
            print(f"bunny-serve: cannot serve the OpenAI API on {args.address}:{args.openai_port}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    try:
        return serve_triton(args)
    finally:
        if front is not None:
            front.stop()


def serve_triton(args: argparse.Namespace) -> int:
    ports = tritonserver.Ports(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port,
                             address=args.address)
    with tempfile.TemporaryDirectory(prefix="bunny-repo-") as tmp:
        repo = Path(tmp) / "model_repository"
        try:
            write_repository(args.repository, repo, overrides(args), args.instances)
        except (ValueError, OSError) as e:
            print(f"bunny-serve: {e}", file=sys.stderr)
            return 2
        cmd = tritonserver.server_command(repo, ports, log_verbose=args.log_verbose, exit_timeout_s=args.exit_timeout,
                                        models=(MODEL_NAME,), extra_args=tuple(args.server_arg))
        proc = subprocess.Popen(cmd, env=tritonserver.server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True,
                                preexec_fn=die_with_parent)
        tail: collections.deque = collections.deque(maxlen=400)
        pump = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
        pump.start()
        stopping = threading.Event()
        stop_deadline = [float("inf")]

        def on_signal(signum, _frame):
            if stopping.is_set():
                proc.kill()
            stopping.set()
            stop_deadline[0] = time.monotonic() + args.exit_timeout + STOP_KILL_GRACE_S
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        deadline, timed_out, ready = time.monotonic() + args.ready_timeout, False, False
        while proc.poll() is None and not stopping.is_set():
            if model_ready(ports):
                print("READY", flush=True)
                ready = True
                break
            if time.monotonic() > deadline:
                print(f"bunny-serve: the model was not ready after {args.ready_timeout:.0f}s", file=sys.stderr)
                timed_out = True
                on_signal(signal.SIGTERM, None)
                break
            time.sleep(0.25)
        stub_died = ready and watch_stubs(proc, ports.http_url, stopping)
        rc = wait_or_kill(proc, stop_deadline)
        left = watchdog.kill_leftover_stubs(repo)
        if left:
            print(f"bunny-serve: killed {len(left)} Python stub process(es) tritonserver left running",
                  file=sys.stderr, flush=True)
        pump.join(timeout=5)
        if stub_died:
            print(f"bunny-serve: tritonserver stopped (status {rc}) after its Python stub died", file=sys.stderr)
            return 1
        if stopping.is_set() and not timed_out:
            exit_timed_out = rc not in (0, -signal.SIGTERM) and any("Exit timeout expired" in l for l in tail)
            if exit_timed_out or rc == -signal.SIGKILL:   # SIGKILL: wait_or_kill's, or a second signal
                # Triton 2.51 can keep a model referenced after a client cancels a gRPC stream whose request
                # had already finished; the unload then waits for the exit timeout. The server did stop.
                print(f"bunny-serve: the model did not unload within {args.exit_timeout}s; tritonserver was "
                      "stopped anyway", file=sys.stderr)
                return 0
            return 0 if rc in (0, -signal.SIGTERM) else rc
        lines = error_lines(tail)
        what = "the model failed to load" if any("failed to load" in l for l in tail) else "the server stopped"
        # Killed by a signal: a crash (Triton 2.51 itself can abort when a stub dies with a request in flight,
        # before the watchdog sees the stub gone). Exit 1, as for any model that died while serving.
        ended = f"was killed by signal {-rc} ({signal.strsignal(-rc)})" if rc < 0 else f"exited with status {rc}"
        print(f"bunny-serve: tritonserver {ended}; {what}:", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
        return 1 if rc < 0 else rc or 1


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.model_path
    if not path.is_dir():
        print(f"bunny-serve: model path {str(path)!r} does not exist or is not a folder", file=sys.stderr)
        return 2
    if not (path / "config.json").is_file():
        print(f"bunny-serve: {str(path)!r} has no config.json; expected a Bunny checkpoint folder", file=sys.stderr)
        return 2
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
