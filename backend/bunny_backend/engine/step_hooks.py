"""The engine's one seam for code outside the package to watch requests and steps (the reliability tests' fault
injector is the one user: tests/fault_injection.py).

BUNNY_ENGINE_HOOKS=MODULE:FACTORY in the environment as an engine starts (MODULE a module name, or the path of a
.py file) makes it call FACTORY() from that module and keep what it returns: its `on_request(seq, prompt)` sees each accepted request, and its
`before_step(seqs)` runs before each step's forward, where raising fails the step as a bug in it would. Unset, the
engine keeps no hooks and pays nothing. The environment reaches engines the tests cannot construct themselves:
the ones inside Triton's stub processes.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Protocol

ENV_VAR = "BUNNY_ENGINE_HOOKS"


class StepHooks(Protocol):
    def on_request(self, seq, prompt) -> None: ...

    def before_step(self, seqs) -> None: ...


def from_environment() -> StepHooks | None:
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return None
    module, _, factory = spec.rpartition(":")
    if not module or not factory:
        raise ValueError(f"{ENV_VAR} must be MODULE:FACTORY, got {spec!r}")
    return getattr(_load(module), factory)()


def _load(module: str):
    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location("bunny_engine_hooks", module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded
