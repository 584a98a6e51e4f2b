"""`bunny-client chat --interactive`: a conversation on one gRPC stream, sent whole as `messages` every turn.

Messages are read from stdin, one a line; answers go to stdout, prompts and token counts to stderr. The images
given with --image belong to the conversation's first message. `/reset` starts a new conversation (with the same
images), `/quit` or end of input ends it.
"""
from __future__ import annotations

import sys

from .chat import print_stats, run_request
from .grpc_requests import BunnyClientError, BunnyStream, RequestOptions

RESET, QUIT = "/reset", "/quit"


def converse(url: str, images: list[bytes], stream: bool, sampling: dict, first: str | None = None,
             stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history: list[dict] = []

    def echo(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    try:
        conn = BunnyStream(url)
    except BunnyClientError as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    with conn:
        pending = first
        while True:
            if pending is None:
                print("you> ", end="", file=sys.stderr, flush=True)
                line = stdin.readline()
                if not line:
                    return 0
                pending = line.strip()
            text, pending = pending, None
            if not text:
                continue
            if text == QUIT:
                return 0
            if text == RESET:
                history.clear()
                print("[conversation cleared]", file=sys.stderr)
                continue
            turn = history + [{"role": "user", "content": text}]
            opts = RequestOptions(messages=turn, images=images, stream=stream, **sampling)
            try:
                result = run_request(conn, opts, on_text=echo if stream else None)
            except BunnyClientError as err:   # the conversation stays as it was; the user may go on
                if stream:
                    stdout.write("\n")
                print(f"bunny-client: {err}", file=sys.stderr)
                continue
            stdout.write(("" if stream else result.text) + "\n")
            stdout.flush()
            print_stats(result)
            if result.text.strip():
                history = turn + [{"role": "assistant", "content": result.text}]
            else:   # the template takes no empty messages
                print("[the answer is empty; this turn is not kept]", file=sys.stderr)
