"""The adapter's engine thread: the engine is built on the thread that will step it.

Why: libgomp gives each thread that starts OpenMP parallel regions a worker pool of its own, and once the pools
hold more threads than there are cores it stops spinning between regions, so every parallel op pays a futex
wake-up (a small elementwise op: 39 us with one pool, 99-131 us beside a second; docs/performance.md). Loading the
model on Triton's request thread made that second pool; the request thread now stays out of torch's parallel ops
(image preprocessing is numpy, io/image.py).
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def start_engine_thread(build: Callable[[], T], loop: Callable[[], None],
                        name: str = "bunny-engine") -> tuple[T, threading.Thread, threading.Event]:
    """Run build() on a new daemon thread and wait for it; that thread then runs loop() once the returned event
    is set (the caller finishes its own setup first). build's exception is raised here, and the thread ends."""
    built: dict = {}
    ready, go = threading.Event(), threading.Event()

    def run() -> None:
        try:
            built["value"] = build()
        except BaseException as e:   # noqa: BLE001 - raised again in the caller
            built["error"] = e
            return
        finally:
            ready.set()
        go.wait()
        loop()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in built:
        raise built["error"]
    return built["value"], thread, go
