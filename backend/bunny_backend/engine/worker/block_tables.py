"""Each running sequence's block table as one persistent row of a tensor on the step's device, written only where it
changed: whole when its sequence joins (or comes back after a preemption with new blocks), only the new tail when
it gains blocks. A step's [n, width] table is then one gather of its sequences' rows, not a tensor rebuilt from
Python lists every step (issue #29).

What makes this safe is the block manager's contract (engine/core/block_manager.py): a sequence's block table only
grows at its end, and freeing its blocks gives the sequence a new, empty list. So a row is valid while its
sequence's `block_table` is the list object the row was written from, and its first `written` entries are still
that list's.

Rows belong to sequences by seq_id. A sequence that left the running set (finished, preempted, aborted) keeps its
row until a newcomer needs one; then the least recently used row of a sequence outside the step is taken, and the
tensor grows only when every row belongs to the step.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

PAD = -1   # past a sequence's last block; the attention kernels never read it


@dataclass(slots=True)
class _Row:
    index: int
    blocks: list[int]   # the sequence's block_table list this row was written from
    written: int        # its leading entries that the row holds


class BlockTables:
    def __init__(self, max_blocks: int, device: torch.device, rows: int = 32):
        """max_blocks: the most blocks a sequence has (the context length in blocks); rows: the starting row count."""
        if max_blocks < 1 or rows < 1:
            raise ValueError(f"max_blocks ({max_blocks}) and rows ({rows}) must be >= 1")
        self.table = torch.full((rows, max_blocks), PAD, dtype=torch.int32, device=device)
        self._rows: OrderedDict[int, _Row] = OrderedDict()   # seq_id -> row, least recently used first
        self._extent = [0] * rows   # per row index: its leading columns that may hold blocks (the rest are PAD)
        self._free = list(range(rows - 1, -1, -1))

    @property
    def max_blocks(self) -> int:
        return self.table.shape[1]

    def rows(self, seqs: Seq) -> list[int]:
        """The row of each of `seqs` (distinct sequences with `seq_id` and `block_table`), after writing, in one
        scatter, what changed since each was last seen."""
        in_step = {s.seq_id for s in seqs}
        rows, cols, values = [], [], []
        out = []
        for seq in seqs:
            blocks = seq.block_table
            if len(blocks) > self.max_blocks:
                raise ValueError(f"sequence {seq.seq_id} has {len(blocks)} blocks, more than the {self.max_blocks} "
                                 "a block-table row holds")
            row = self._rows.get(seq.seq_id)
            if row is None:
                row = self._rows[seq.seq_id] = _Row(self._take_row(in_step), blocks, 0)
            else:
                self._rows.move_to_end(seq.seq_id)
                if row.blocks is not blocks:   # its blocks were freed: a new table from its first entry
                    row.blocks, row.written = blocks, 0
            i, n = row.index, len(blocks)
            if row.written < n:
                rows += [i] * (n - row.written)
                cols += range(row.written, n)
                values += blocks[row.written:]
            if self._extent[i] > n:   # what a previous table or owner left past this one's end
                rows += [i] * (self._extent[i] - n)
                cols += range(n, self._extent[i])
                values += [PAD] * (self._extent[i] - n)
            row.written = self._extent[i] = n
            out.append(i)
        if values:
            device = self.table.device
            index = torch.tensor([rows, cols], dtype=torch.int64).to(device)
            self.table.index_put_((index[0], index[1]), torch.tensor(values, dtype=torch.int32).to(device))
        return out

    def gather(self, rows: list[int], width: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The step's table [len(rows), width] (int32, PAD past each sequence's blocks): the rows' first `width`
        columns; into `out` where given."""
        index = torch.tensor(rows, dtype=torch.int64).to(self.table.device)
        return torch.index_select(self.table[:, :width], 0, index, out=out)

    def _take_row(self, in_step: set[int]) -> int:
        if not self._free:
            victim = next((sid for sid in self._rows if sid not in in_step), None)
            if victim is None:
                self._grow()
            else:
                self._free.append(self._rows.pop(victim).index)
        return self._free.pop()

    def _grow(self) -> None:
        old = self.table
        self.table = torch.full((2 * old.shape[0], old.shape[1]), PAD, dtype=old.dtype, device=old.device)
        self.table[:old.shape[0]] = old
        self._extent += [0] * old.shape[0]
        self._free = list(range(self.table.shape[0] - 1, old.shape[0] - 1, -1))
