"""`./build.sh run`: start bunny-serve on free ports, send one streamed chat request with the bundled example
image through gRPC, print the answer and the speed, stop the server.

    python -m bunny_backend.tools.run_demo --model-path models/bunny-demo [--prompt TEXT] [--max-tokens N]
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from bunny_backend.server.launch import free_ports, launch, serve_command
from bunny_backend.server.tritonserver import ROOT

DEFAULT_PROMPT = "Describe this image in detail."


def example_image() -> Path:
    try:
        from bunny_backend.tools.demo_checkpoint import EXAMPLE_IMAGE
        if Path(EXAMPLE_IMAGE).is_file():
            return Path(EXAMPLE_IMAGE)
    except ImportError:
        pass
    found = sorted(Path(__file__).resolve().parent.glob("*.png"))
    if not found:
        raise FileNotFoundError("no example image (backend/bunny_backend/tools/example.png) found")
    return found[0]


def start_server(model_path: Path, ports: list[int], log_file, timeout_s: float) -> subprocess.Popen:
    return launch(serve_command(model_path, ports, extra_args=["--exit-timeout", "5"]), log_file, timeout_s)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_once(url: str, prompt: str, image: bytes, max_tokens: int):
    """Stream one request; the answer is printed as it arrives. Returns bunny_client's ChatResult and its latency
    in words."""
    from bunny_client.chat import chat, latency_label

    def echo(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = chat(url, prompt, image, stream=True, on_text=echo, max_tokens=max_tokens)
    return result, latency_label(result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="run_demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, type=Path)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--image", type=Path, help="default: the bundled example image")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--server-log", type=Path, help="write the server log here (default: only shown on failure)")
    args = p.parse_args(argv)

    if not (args.model_path / "config.json").is_file():
        print(f"run_demo: no checkpoint at {args.model_path} (run ./build.sh setup)", file=sys.stderr)
        return 2
    image_path = args.image or example_image()
    log_path = args.server_log or ROOT / "build" / "run_demo-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3)
    print(f"[demo] starting bunny-serve (gRPC 127.0.0.1:{ports[0]}, log {log_path})", file=sys.stderr)
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        try:
            proc = start_server(args.model_path, ports, log_file, args.ready_timeout)
        except RuntimeError as e:
            log_file.flush()
            print(f"run_demo: {e}\n--- server log (tail) ---\n{log_path.read_text(errors='replace')[-4000:]}",
                  file=sys.stderr)
            return 1
        try:
            print(f"[demo] server ready in {time.perf_counter() - t0:.1f}s; image {image_path.name}, "
                  f"prompt {args.prompt!r}", file=sys.stderr)
            print(f"USER: {args.prompt}\nASSISTANT: ", end="", flush=True)
            result, latency = chat_once(f"127.0.0.1:{ports[0]}", args.prompt, image_path.read_bytes(), args.max_tokens)
            print()
            print(f"[demo] {result.completion_tokens} tokens (prompt {result.prompt_tokens}, "
                  f"finish {result.finish_reason}), {latency}, "
                  f"{result.tokens_per_s:.1f} tokens/s")
        except Exception as e:
            print(f"\nrun_demo: the request failed: {e}", file=sys.stderr)
            return 1
        finally:
            stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
