"""The environment of the processes that run the engine (bunny-serve's stub processes, the bench's workers), set
before they start: torch's allocator and libgomp read it once. A value already set stands.

- THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator aligns allocations of 2 MB and more to 2 MB and asks the kernel
  for transparent huge pages (madvise), granted where its THP mode is `madvise` or `always`. A decode step streams
  every weight and the whole KV cache from memory: on 4 KB pages the hardware prefetcher stops at every page edge
  and the TLB misses all the time. Huge pages made batch-10 decode steps 5-7% faster and batch-1 3-18%
  (docs/performance.md). No effect on accelerators' memory.

Not set here: OMP_WAIT_POLICY. Passive OpenMP threads keep the demo's decode at ~450 tokens/s with another process
busy on one of 2 cores (spinning ones fall to ~30), but cost a quiet machine ~40% of it (290-395 against 552-699
tokens/s, alternated; bench/log/2026-12-04-streaming-capacity.md): a user whose host is shared can set it.
"""
from __future__ import annotations

ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def engine_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with each setting added unless it already has one."""
    for key, value in ENV.items():
        env.setdefault(key, value)
    return env
