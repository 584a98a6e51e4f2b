"""The reliability tests' fault injector, installed in an engine through its one seam (engine/step_hooks.py):
`monkeypatch.setenv(*ENGINE_HOOKS)` in-process, and the same variable in the environment of a server, whose stub
processes start the engines (server_fixture.py).

A request whose text contains FAULT_MARKER makes every step that includes it raise InjectedFault once it has
generated FAULT_AFTER_TOKENS tokens: mid-stream, inside a batch, as a bug tied to one request's data would. A
request whose text contains SLOW_MARKER makes every step it is in last SLOW_STEP_S longer, so that tests can hold
requests in flight without racing the engine.
"""
from __future__ import annotations

import time
import weakref
from pathlib import Path

ENGINE_HOOKS = ("BUNNY_ENGINE_HOOKS", f"{Path(__file__).resolve()}:FaultInjector")   # this file, by path
FAULT_MARKER = "<<bunny-test-fault>>"
FAULT_AFTER_TOKENS = 2
SLOW_MARKER = "<<bunny-test-slow>>"
SLOW_STEP_S = 0.1


class InjectedFault(RuntimeError):
    pass


class FaultInjector:
    def __init__(self):
        self._faulty: weakref.WeakSet = weakref.WeakSet()   # sequences, forgotten once the engine drops them
        self._slow: weakref.WeakSet = weakref.WeakSet()

    def on_request(self, seq, prompt) -> None:
        """prompt: the request's text, or its conversation (Messages)."""
        text = prompt if isinstance(prompt, str) else " ".join(m.content for m in prompt)
        if FAULT_MARKER in text:
            self._faulty.add(seq)
        if SLOW_MARKER in text:
            self._slow.add(seq)

    def before_step(self, seqs) -> None:
        """Raise InjectedFault if a faulty sequence in this step has generated enough tokens; sleep for a slow one."""
        for seq in seqs:
            if seq in self._faulty and seq.num_completion_tokens >= FAULT_AFTER_TOKENS:
                raise InjectedFault(f"injected test fault (request {seq.request_id})")
        if any(seq in self._slow for seq in seqs):
            time.sleep(SLOW_STEP_S)
