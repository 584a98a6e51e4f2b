"""Test-only fault injection: lets the reliability tests make one request break the engine step it is in.

Off unless BUNNY_TEST_FAULT_INJECTION=1 is in the environment when the engine starts. Then a request whose
text contains FAULT_MARKER is flagged, and every step that includes it raises InjectedFault once it has
generated FAULT_AFTER_TOKENS tokens: mid-stream, inside a batch, as a bug tied to one request's data would.
A request whose text contains SLOW_MARKER makes every step it is in last SLOW_STEP_S longer, so that tests can
hold requests in flight without racing the engine.
"""
from __future__ import annotations

import os
import time

ENV_VAR = "BUNNY_TEST_FAULT_INJECTION"
FAULT_MARKER = "<<bunny-test-fault>>"
FAULT_AFTER_TOKENS = 2
SLOW_MARKER = "<<bunny-test-slow>>"
SLOW_STEP_S = 0.1


class InjectedFault(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(ENV_VAR) == "1"


def flag(seq, text: str) -> None:
    seq.inject_fault = FAULT_MARKER in text
    seq.inject_slow = SLOW_MARKER in text


def check(seqs) -> None:
    """Raise InjectedFault if a flagged sequence in this step has generated enough tokens; sleep for a slow one."""
    for seq in seqs:
        if seq.inject_fault and seq.num_completion_tokens >= FAULT_AFTER_TOKENS:
            raise InjectedFault(f"injected test fault (request {seq.request_id})")
    if any(seq.inject_slow for seq in seqs):
        time.sleep(SLOW_STEP_S)
