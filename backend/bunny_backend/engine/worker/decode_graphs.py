"""CUDA graphs for decode steps: the decode forward (embeddings, layers, LM head and greedy argmax) captured once per
padded batch size and replayed, so a step costs one replay instead of hundreds of kernel launches from Python. The
logits and their argmax land in LogitsHead's static buffers (graph_capture.py), shared with the mixed-step graphs.

A graph replays the kernels it captured on the tensors it captured, so every input lives in a static buffer that
`run()` fills before `replay()`: token ids, positions, cache slots and context lengths in one copy, and the block
tables as one gather from the persistent rows of block_tables.py. A batch of n runs in the smallest captured
size >= n; the padding rows read and write one scratch KV block that the block manager never hands out (the model
runner allocates it past the managed blocks), so they touch nobody's cache. Sampling stays outside the graph
unless every row is plain greedy (the runner then takes the argmax). Capture needs an attention backend whose
decode reads only device tensors (the Triton paged-decode kernel; the portable gather does too).
"""
from __future__ import annotations

import torch

from bunny_backend.engine.worker.block_tables import BlockTables
from bunny_backend.engine.worker.graph_capture import Captured, GraphCapture, LogitsHead
from bunny_backend.utils.context import ForwardContext, reset_context, set_context, token_slots

DEFAULT_SIZES = (1, 2, 4, 8, *range(16, 513, 16))


def graph_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in DEFAULT_SIZES if b < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, head: LogitsHead, max_batch: int, max_blocks: int, scratch_block: int,
                 block_size: int, device: torch.device, capture: GraphCapture):
        self.model, self.head, self.max_blocks, self.sizes = model, head, max_blocks, graph_sizes(max_batch)
        self.scratch_slot = token_slots([scratch_block], 0, 1, block_size)[0]
        self.scratch_block = scratch_block
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.int64, device=device)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.tables = torch.full((max_batch, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.graphs: dict[int, Captured] = {}
        self._capture_all(capture)

    def _context(self, bs: int) -> ForwardContext:
        return ForwardContext(is_prefill=False, slot_mapping=self.slots[:bs], context_lens=self.lens[:bs],
                              block_tables=self.tables[:bs], in_graph=True)

    def _forward(self, bs: int) -> torch.Tensor:
        set_context(self._context(bs))
        try:
            embeds = self.model.model.embed_tokens(self.ids[:bs])   # decode ids are never image rows
            hidden = self.model(embeds, self.positions[:bs])
        finally:
            reset_context()
        return self.head(hidden)

    @torch.inference_mode()
    def _capture_all(self, capture) -> None:
        for bs in sorted(self.sizes, reverse=True):
            self.graphs[bs] = capture.capture(lambda bs=bs: self._forward(bs))
        self._reset_padding(0, max(self.sizes))   # capture ran on the buffers' dummy contents

    def can_run(self, batch: int, table_width: int) -> bool:
        return batch <= self.sizes[-1] and table_width <= self.max_blocks

    def _reset_padding(self, start: int, end: int) -> None:
        self.ids[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = self.scratch_slot
        self.lens[start:end] = 1
        self.tables[start:end] = self.scratch_block

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int],
            block_tables: BlockTables, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, vocab], their argmax [n]) of one decode step over n sequences, whose block tables are
        `rows` of `block_tables`: views of the static buffers, valid until the next replay."""
        n = len(ids)
        bs = next(b for b in self.sizes if b >= n)
        host = torch.tensor([ids, positions, slots, lens], dtype=torch.int64).to(self.ids.device)
        self.ids[:n].copy_(host[0])
        self.positions[:n].copy_(host[1])
        self.slots[:n].copy_(host[2])
        self.lens[:n].copy_(host[3])
        block_tables.gather(rows, self.max_blocks, out=self.tables[:n])
        self._reset_padding(n, bs)
        self.graphs[bs].replay()
        return self.head.logits[:n], self.head.tokens[:n]
