"""A timeline of the Triton adapter's work, for finding where time goes between the engine and the client.

Off unless the environment variable BUNNY_TIMELINE names a file (the bench sets it on bunny-serve; Triton's python
stub inherits it). Then each request's acceptance (arrival in execute(), return of engine.add_request), each
engine step (start, end, outputs) and each response (when the engine thread handed it
over, when `sender.send` began and returned, the client's request id and the token count) is kept in memory and
appended to that file as JSON lines whenever the engine goes idle and at unload. Times are `time.perf_counter()`,
CLOCK_MONOTONIC on Linux, so they line up with a client's on the same machine (bench/timeline.py).
"""
from __future__ import annotations

import json
import os

ENV = "BUNNY_TIMELINE"


class Timeline:
    def __init__(self, path: str | None):
        self.path = path or None
        self._events: list[dict] = []

    @classmethod
    def from_environment(cls) -> "Timeline":
        return cls(os.environ.get(ENV))

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, **event) -> None:
        if self.path is not None:
            self._events.append(event)          # list.append is atomic: the engine and responder threads share it

    def flush(self) -> None:
        if self.path is None or not self._events:
            return
        events, self._events = self._events, []
        with open(self.path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
