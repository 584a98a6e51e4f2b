"""`bunny-openai`: the OpenAI-compatible API (docs/api/openai.md) in front of any Triton that serves this model.

It needs no checkpoint and no GPU: it only talks to Triton's gRPC endpoint (with TLS and headers when asked). It
starts whether or not Triton is up; /health answers 503 until the model is ready there. SIGTERM/SIGINT stop it.
Exit status: 0 after a stop, 2 for bad arguments or a port that cannot be bound.
"""
from __future__ import annotations

import argparse
import sys

from .options import add_shared_arguments, add_triton_arguments, from_args
from .runner import bind, serve_forever

DEFAULT_PORT = 9000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bunny-openai", description=__doc__.split("\n")[0])
    add_triton_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})")
    add_shared_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = from_args(args)
    except ValueError as e:
        print(f"bunny-openai: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"bunny-openai: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"bunny-openai: serving {', '.join(options.names)} on http://{args.host}:{sock.getsockname()[1]}/v1 "
          f"for Triton at {options.triton_url} (model {options.model!r})", file=sys.stderr, flush=True)
    serve_forever(sock, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
