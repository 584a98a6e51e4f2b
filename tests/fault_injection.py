"""Test-only fault injection: lets the reliability tests make one request break the engine step it is in.

The engine's one hook point: `LLMEngine` holds a `FaultInjector` only when BUNNY_TEST_FAULT_INJECTION=1 is in the
environment as it starts, and then shows it each accepted request's prompt and each step's sequences. A request
whose text contains FAULT_MARKER makes every step that includes it raise InjectedFault once it has generated
FAULT_AFTER_TOKENS tokens: mid-stream, inside a batch, as a bug tied to one request's data would. A request whose
text contains SLOW_MARKER makes every step it is in last SLOW_STEP_S longer, so that tests can hold requests in
flight without racing the engine. Nothing of this lives on the runtime types.
"""
from __future__ import annotations

import os
import time
import weakref

ENV_VAR = "BUNNY_TEST_FAULT_INJECTION"
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


def from_environment() -> FaultInjector | None:
    return FaultInjector() if os.environ.get(ENV_VAR) == "1" else None
