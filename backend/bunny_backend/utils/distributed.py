"""One engine's tensor-parallel group: its rank and size, and the collectives the sharded model calls.

Rank 0 is the engine inside Triton's stub, ranks 1..N-1 the worker processes it spawns (engine/executor/tp_group.py); they
form torch.distributed's default process group (gloo on CPU, nccl on CUDA, hccl on Ascend), so a process holds
one tensor-parallel engine at a time. With size 1 every collective is a no-op and torch.distributed is not touched.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
# A collective waits this long for its peers. Ranks meet at every row-parallel layer of every step, so a wait
# this long means a peer is stuck; a dead one is seen at once (gloo: "Connection closed by peer").
COLLECTIVE_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    backend: str = ""   # the torch.distributed backend (DIST_BACKENDS), once the group is formed

    @property
    def is_driver(self) -> bool:
        """Rank 0: schedules, samples, detokenizes, and runs the vision tower."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (after a row-parallel layer, or the vocabulary-parallel embedding)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets every rank's `x` concatenated along the last dimension (in rank order); others get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if self.backend == "hccl":   # HCCL has no gather: every rank receives
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
            dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x` (same shape and dtype everywhere)."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x


SINGLE = TensorParallel()


def init_group(rank: int, size: int, device: torch.device, port: int) -> TensorParallel:
    """Join the group of `size` ranks meeting at 127.0.0.1:port; every rank calls this, rank 0 first or not."""
    if device.type == "npu":
        import torch_npu  # noqa: F401  (registers the hccl backend)
    backend = DIST_BACKENDS[device.type]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return TensorParallel(rank, size, backend)


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
