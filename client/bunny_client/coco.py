"""`bunny-client coco`: caption every image of a folder through the server (the seed's precision run).

N requests in flight (one stream per worker thread), a progress bar on stderr, the output JSON rewritten
atomically every few seconds, `--resume` skipping files that already have a caption. A failed image is
reported on stderr and counted; the job goes on. Exit status: 0 when at least one image was captioned (or
nothing was left to do), 1 when every pending image failed or the server cannot be reached; with `--strict`,
1 on any failure.
"""
from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .captions import (DEFAULT_CAPTION_TOKENS, DEFAULT_PROMPT, CaptionWriter, list_images, load_captions,
                       pending_images)
from .chat import run_request
from .grpc_requests import DEFAULT_URL, BunnyClientError, BunnyStream, RequestOptions


class _Workers:
    """One BunnyStream per worker thread, reopened after a failure."""

    def __init__(self, url: str):
        self.url = url
        self._local = threading.local()
        self._all: list[BunnyStream] = []
        self._lock = threading.Lock()

    def caption(self, path: Path, prompt: str, max_tokens: int) -> str:
        data = path.read_bytes()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = BunnyStream(self.url)
            with self._lock:
                self._all.append(conn)
        try:
            result = run_request(conn, RequestOptions(text=prompt, images=[data], max_tokens=max_tokens,
                                                      temperature=0.0))
        except BunnyClientError:
            conn.close()
            self._local.conn = None
            raise
        text = result.text.strip()
        if not text:
            raise BunnyClientError("empty caption")
        return text

    def close(self) -> None:
        for conn in self._all:
            conn.close()


def caption_folder(url: str, images_dir: str | Path, out: str | Path, prompt: str = DEFAULT_PROMPT,
                   concurrency: int = 4, resume: bool = False, max_tokens: int = DEFAULT_CAPTION_TOKENS,
                   progress: bool = True) -> tuple[int, int, int]:
    """Caption the images; returns (captioned, failed, skipped). Raises BunnyClientError when unreachable."""
    images = list_images(images_dir)
    done = load_captions(out) if resume else {}
    todo = pending_images(images, done)
    writer = CaptionWriter(out, initial={p.name: done[p.name] for p in images if done.get(p.name)})
    BunnyStream(url).close()  # fail fast, with one readable line, when the server is down
    workers = _Workers(url)
    ok = failed = 0
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = {pool.submit(workers.caption, p, prompt, max_tokens): p for p in todo}
            for future in as_completed(futures):
                path = futures[future]
                try:
                    writer.add(path.name, future.result())
                    ok += 1
                except (BunnyClientError, OSError) as err:
                    failed += 1
                    tqdm.write(f"bunny-client: {path.name}: {err}", file=sys.stderr)
                bar.update(1)
    finally:
        bar.close()
        writer.close()
        workers.close()
    return ok, failed, len(images) - len(todo)


def add_parser(sub) -> None:
    p = sub.add_parser("coco", help="caption every JPEG/PNG of a folder into predict_result.json")
    p.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC address (default %(default)s)")
    p.add_argument("--images", required=True, type=Path, help="folder of images")
    p.add_argument("--out", type=Path, default=Path("predict_result.json"), help="output JSON (default %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked for each image (default %(default)r)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="keep the captions already in --out, do the rest")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_CAPTION_TOKENS, help="default %(default)s")
    p.add_argument("--strict", action="store_true", help="exit 1 when any image failed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        ok, failed, skipped = caption_folder(args.url, args.images, args.out, args.prompt, args.concurrency,
                                             args.resume, args.max_tokens)
    except (BunnyClientError, FileNotFoundError, ValueError) as err:
        print(f"bunny-client: {err}", file=sys.stderr)
        return 1
    print(f"coco: {ok} captioned, {failed} failed, {skipped} already done -> {args.out}", file=sys.stderr)
    if failed and (args.strict or ok == 0):
        return 1
    return 0
