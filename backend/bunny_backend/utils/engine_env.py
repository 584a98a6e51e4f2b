"""The environment of the processes that run the engine (bunny-serve's stub processes, the bench's workers), set
before they start: torch's allocator and libgomp read it once. A value already set stands.

- THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator aligns allocations of 2 MB and more to 2 MB and asks the kernel
  for transparent huge pages (madvise), granted where its THP mode is `madvise` or `always`. A decode step streams
  every weight and the whole KV cache from memory: on 4 KB pages the hardware prefetcher stops at every page edge
  and the TLB misses all the time. Huge pages made batch-10 decode steps 5-7% faster and batch-1 3-18%
  (docs/performance.md). No effect on accelerators' memory.

Not set here: OMP_WAIT_POLICY. Passive OpenMP threads survive a busy neighbour but cost a quiet machine ~40% of
the demo's decode (bench/log/2026-12-04-streaming-capacity.md); the engine lowers its thread count instead when
it measures the stall (engine/worker/cpu_threads.py). A user can still set it.
"""
from __future__ import annotations

ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def engine_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with each setting added unless it already has one."""
    for key, value in ENV.items():
        env.setdefault(key, value)
    return env
