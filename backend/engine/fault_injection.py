"""Test-only fault injection: lets the reliability tests make one request break the engine step it is in.

Off unless BUNNY_TEST_FAULT_INJECTION=1 is in the environment when the engine starts. Then a request whose
text contains FAULT_MARKER is flagged, and every step that includes it raises InjectedFault once it has
generated FAULT_AFTER_TOKENS tokens: mid-stream, inside a batch, as a bug tied to one request's data would.
"""
from __future__ import annotations

import os

ENV_VAR = "BUNNY_TEST_FAULT_INJECTION"
FAULT_MARKER = "<<bunny-test-fault>>"
FAULT_AFTER_TOKENS = 2


class InjectedFault(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(ENV_VAR) == "1"


def wants_fault(text: str) -> bool:
    return FAULT_MARKER in text


def check(seqs) -> None:
    """Raise InjectedFault if a flagged sequence in this step has generated enough tokens."""
    for seq in seqs:
        if seq.inject_fault and seq.num_completion_tokens >= FAULT_AFTER_TOKENS:
            raise InjectedFault(f"injected test fault (request {seq.request_id})")
