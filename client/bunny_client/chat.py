"""`bunny-client chat`: one request (or, with --interactive, a conversation), the answer on stdout, token counts
and speed on stderr."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .grpc_requests import DEFAULT_URL, BunnyClientError, BunnyStream, RequestOptions, TokenLogprob


@dataclass(slots=True)
class ChatResult:
    text: str
    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None   # time to the first response that carried tokens; None unless streamed (one response)
    elapsed_s: float
    logprobs: list[TokenLogprob] | None = None   # one per id when the request asked for logprobs

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def run_request(stream: BunnyStream, opts: RequestOptions, on_text: Callable[[str], None] | None = None) -> ChatResult:
    """Send one request on an open stream and gather its responses."""
    t0 = time.perf_counter()
    texts: list[str] = []
    ids: list[int] = []
    ttft = None
    reason, prompt, completion = "", None, None
    logprobs = None
    for delta in stream.generate(opts):
        if delta.logprobs is not None:
            logprobs = logprobs if logprobs is not None else []
            logprobs.extend(delta.logprobs)
        if ttft is None and (delta.ids or delta.text):
            ttft = delta.t - t0
        texts.append(delta.text)
        ids.extend(delta.ids)
        if on_text and delta.text:
            on_text(delta.text)
        reason = delta.finish_reason or reason
        prompt = delta.prompt_tokens if delta.prompt_tokens is not None else prompt
        completion = delta.completion_tokens if delta.completion_tokens is not None else completion
    elapsed = time.perf_counter() - t0
    return ChatResult(
        text="".join(texts),
        ids=ids,
        finish_reason=reason,
        prompt_tokens=prompt or 0,
        completion_tokens=completion if completion is not None else len(ids),
        ttft_s=(ttft if ttft is not None else elapsed) if opts.stream else None,
        elapsed_s=elapsed,
        logprobs=logprobs,
    )


def chat(url: str, text: str, images: bytes | list[bytes] | None = None, stream: bool = False,
         on_text: Callable[[str], None] | None = None, **sampling) -> ChatResult:
    """One chat turn against the server at `url` with an image file's bytes or a list of them; `sampling` takes
    RequestOptions fields (max_tokens, ...)."""
    images = [images] if isinstance(images, bytes) else list(images or [])
    opts = RequestOptions(text=text, images=images, stream=stream, **sampling)
    with BunnyStream(url) as conn:
        return run_request(conn, opts, on_text)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, help="upper bound on new tokens (server default 256)")
    p.add_argument("--temperature", type=float, help="0 means greedy (the default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--min-tokens", type=int, help="no EOS and no stop strings before this many new tokens")
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="print each token's logprob and the K most likely tokens (1 to 20) on stderr")


def sampling_from_args(args: argparse.Namespace) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "ignore_eos",
            "presence_penalty", "frequency_penalty", "min_tokens", "logprobs")
    return {k: getattr(args, k) for k in keys}


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="send one message (and images) and print the answer; or hold a conversation")
    p.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address (default %(default)s)")
    p.add_argument("--image", type=Path, action="append", default=[],
                   help="an image file (JPEG, PNG, WebP, BMP); repeatable, up to the server's max_images_per_request")
    p.add_argument("--interactive", action="store_true",
                   help="a conversation: read messages from stdin, one a line (/reset starts over, /quit ends)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--no-chat-template", action="store_true", help="send TEXT as the whole prompt")
    add_sampling_args(p)
    p.add_argument("text", metavar="TEXT", nargs="?", help="the message (with --interactive: the first one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    images = []
    for path in args.image:
        try:
            images.append(path.read_bytes())
        except OSError as err:
            print(f"bunny-client: cannot read image {path}: {err.strerror}", file=sys.stderr)
            return 2
    sampling = sampling_from_args(args)
    if args.interactive:
        if args.no_chat_template:
            print("bunny-client: --interactive needs the chat template", file=sys.stderr)
            return 2
        from .interactive import converse
        return converse(args.url, images, args.stream, sampling, first=args.text)
    if not args.text:
        print("bunny-client: chat needs TEXT (or --interactive)", file=sys.stderr)
        return 2
    if args.no_chat_template:
        sampling["apply_chat_template"] = False

    def echo(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        result = chat(args.url, args.text, images, stream=args.stream,
                      on_text=echo if args.stream else None, **sampling)
    except BunnyClientError as err:
        if args.stream:
            sys.stdout.write("\n")
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    print("" if args.stream else result.text)
    if result.logprobs is not None:
        print_logprobs(result.logprobs)
    print_stats(result)
    return 0


def print_logprobs(logprobs: list[TokenLogprob]) -> None:
    """One line per token on stderr: its bytes and logprob, then the top alternatives."""
    for lp in logprobs:
        top = "  ".join(f"{t.bytes!r} {t.logprob:.4f}" for t in lp.top)
        print(f"{lp.bytes!r} {lp.logprob:.4f} | {top}", file=sys.stderr)


def latency_label(result: ChatResult) -> str:
    """A streamed answer's first token, or the whole answer's latency (one response: no first token to time)."""
    if result.ttft_s is None:
        return f"latency {result.elapsed_s * 1000:.0f} ms"
    return f"first token {result.ttft_s * 1000:.0f} ms"


def print_stats(result: ChatResult) -> None:
    print(f"[prompt {result.prompt_tokens} tokens, completion {result.completion_tokens} tokens, "
          f"finish {result.finish_reason or '?'}, {latency_label(result)}, "
          f"{result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
