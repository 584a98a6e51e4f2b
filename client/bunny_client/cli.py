"""`bunny-client`: chat | coco | reference | clip-score | perf (docs/client.md)."""
from __future__ import annotations

import argparse
import sys

from . import chat, clip_score, coco, perf, reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bunny-client", description="gRPC client of the Triton model `bunny`")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (chat, coco, reference, clip_score, perf):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bunny-client: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
