"""What the CUDA graphs of decode steps (decode_graphs.py) and of mixed steps (mixed_graphs.py) share: the capture
contract, `capture(fn) -> Captured`, with torch.cuda's implementation (`GraphCapture`; the tests replay eagerly on
the CPU with an object of the same shape), and the LM head with greedy argmax inside the graph (`LogitsHead`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Captured:
    replay: Callable[[], None]
    output: torch.Tensor


class GraphCapture:
    """torch.cuda graphs, all sizes sharing one memory pool (captured largest first)."""

    def __init__(self):
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> Captured:
        side = torch.cuda.Stream()   # warm-up outside the graph (Triton compiles, cuBLAS picks its kernels)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return Captured(graph.replay, out)


class LogitsHead:
    """The LM head and greedy argmax as the last kernels of a graph. Their results land in two static buffers that
    every graph shares (`logits` [rows, vocab] in the model's dtype, `tokens` [rows] int64) rather than in outputs
    of each graph's own, so the captured sizes cost one [rows, vocab] buffer between them, not one each. A graph's
    rows are valid until the next replay."""

    def __init__(self, model, rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        probe = model.compute_logits(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.model = model
        self.logits = torch.zeros(rows, probe.shape[-1], dtype=probe.dtype, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=device)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden_size] -> logits[:n] (and tokens[:n], their argmax: the sampler's greedy choice)."""
        n = hidden.shape[0]
        if n > self.logits.shape[0]:
            raise ValueError(f"{n} rows for a logits buffer of {self.logits.shape[0]}")
        logits = self.model.compute_logits(hidden)
        self.logits[:n].copy_(logits)
        torch.argmax(logits, dim=-1, out=self.tokens[:n])
        return self.logits[:n]
