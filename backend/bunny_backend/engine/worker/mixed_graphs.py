"""CUDA graphs for whole steps that prefill (issue #29 item 3): prompt chunks, cached prefixes and decode rows in one
forward, padded to a token count T from a fixed ladder and to a fixed sequence count, captured once per T at load
and replayed. Attention is one launch of the varlen paged kernel over the whole batch (ops/triton_prefill.py): its
grid, T // BLOCK_Q + sequences, is known from the padded shape alone, and a decode row is a sequence of one query
token, so nothing in the graph depends on a length read back to the host. The LM head and greedy argmax run in the
graph too (graph_capture.LogitsHead), over one output row per sequence: its last new token.

Padding. Sequences: the graph holds max_seqs + 1. The step's n come first, then zero-length ones, then a sink that
owns the T - N padding tokens as a fresh prompt, so cu_seqlens_q always ends at T and every padding token belongs
to a sequence. The padding tokens' K/V go to the scratch block (the block manager never hands it out; the model
runner allocates it past the managed blocks) and the sink's table row is all scratch, like DecodeGraphs' padding
rows; a zero-length sequence's output row is the last token and its table's first entry the scratch block, so it
reads one scratch slot. Their logits are never read.

Inputs live in static buffers that `run()` fills: the input embeddings (token embeddings with the image feature
rows put in, computed before the replay: placing a step's image rows is not a fixed-shape operation), positions,
slots, cu_seqlens_q, the lengths, the output rows, and the block tables gathered from block_tables.py's rows. The
context's host lists (seqlens_q, seqlens_k) are updated in place each step for the portable attention, which
loops over them on the CPU; the graph itself never reads them (ForwardContext.in_graph).
"""
from __future__ import annotations

import itertools

import torch

from bunny_backend.engine.worker.block_tables import BlockTables
from bunny_backend.engine.worker.graph_capture import Captured, GraphCapture, LogitsHead
from bunny_backend.utils.context import ForwardContext, reset_context, set_context, token_slots

# Padded token counts: steps of at most 1.5x, so padding wastes less than a third of a step.
TOKEN_LADDER = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)


def token_sizes(max_tokens: int) -> list[int]:
    """The ladder's sizes below the step token budget, and the budget."""
    return [t for t in TOKEN_LADDER if t < max_tokens] + [max_tokens]


class MixedGraphs:
    def __init__(self, model, head: LogitsHead, max_tokens: int, max_seqs: int, max_blocks: int,
                 scratch_block: int, block_size: int, device: torch.device, capture: GraphCapture):
        self.model, self.head = model, head
        self.sizes, self.max_seqs, self.max_blocks = token_sizes(max_tokens), max_seqs, max_blocks
        self.scratch_block = scratch_block
        self.scratch_slot = token_slots([scratch_block], 0, 1, block_size)[0]
        seqs, tokens = max_seqs + 1, self.sizes[-1]
        width = max(max_blocks, -(-tokens // block_size))   # the sink's row covers a whole step's tokens
        weight = model.model.embed_tokens.weight
        self.embeds = torch.zeros(tokens, weight.shape[1], dtype=weight.dtype, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slots = torch.full((tokens,), self.scratch_slot, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.zeros(seqs + 1, dtype=torch.int32, device=device)
        self.seqlens_k = torch.zeros(seqs, dtype=torch.int32, device=device)
        self.output_rows = torch.zeros(seqs, dtype=torch.int64, device=device)
        self.output_lens = torch.ones(seqs, dtype=torch.int32, device=device)
        self.tables = torch.full((seqs, width), scratch_block, dtype=torch.int32, device=device)
        self.host_q, self.host_k, self.host_out_k = [0] * seqs, [0] * seqs, [1] * seqs
        self.graphs: dict[int, Captured] = {}
        self._capture_all(capture)

    def _context(self, tokens: int) -> ForwardContext:
        outputs = ForwardContext(is_prefill=False, context_lens=self.output_lens, block_tables=self.tables,
                                 seqlens_k=self.host_out_k, in_graph=True)
        return ForwardContext(is_prefill=True, cu_seqlens_q=self.cu_seqlens_q, max_seqlen_q=tokens,
                              slot_mapping=self.slots[:tokens], context_lens=self.seqlens_k, block_tables=self.tables,
                              seqlens_q=self.host_q, seqlens_k=self.host_k, output_rows=self.output_rows,
                              outputs=outputs, in_graph=True)

    def _forward(self, tokens: int) -> torch.Tensor:
        set_context(self._context(tokens))
        try:
            hidden = self.model(self.embeds[:tokens], self.positions[:tokens])   # the output rows only
        finally:
            reset_context()
        return self.head(hidden)

    @torch.inference_mode()
    def _capture_all(self, capture) -> None:
        # The buffers' first contents are a valid step: every sequence empty, output rows on the scratch block.
        for tokens in sorted(self.sizes, reverse=True):
            self.graphs[tokens] = capture.capture(lambda tokens=tokens: self._forward(tokens))

    def can_run(self, num_seqs: int, num_tokens: int, table_width: int) -> bool:
        return num_seqs <= self.max_seqs and num_tokens <= self.sizes[-1] and table_width <= self.max_blocks

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int], seqlens_q: list[int],
            seqlens_k: list[int], image_embeds: torch.Tensor | None, block_tables: BlockTables,
            rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step over n sequences packed as the eager path packs them (sequence i computes its last
        seqlens_q[i] of seqlens_k[i] tokens; its blocks are `rows[i]` of `block_tables`): (logits [n, vocab], their
        argmax [n]) of each sequence's last new token, views of static buffers valid until the next replay."""
        n, real = len(seqlens_q), len(ids)
        tokens = next(t for t in self.sizes if t >= real)
        pad, empty = tokens - real, self.max_seqs - n
        ends = list(itertools.accumulate(seqlens_q))
        self.host_q[:] = list(seqlens_q) + [0] * empty + [pad]
        self.host_k[:] = list(seqlens_k) + [0] * empty + [pad]
        self.host_out_k[:] = list(seqlens_k) + [1] * (empty + 1)
        out_rows = [e - 1 for e in ends] + [tokens - 1] * (empty + 1)
        cu = [0] + ends + [real] * empty + [tokens]
        host = torch.tensor(list(positions) + [0] * pad + list(slots) + [self.scratch_slot] * pad + cu
                            + self.host_k + out_rows + self.host_out_k, dtype=torch.int64).to(self.positions.device)
        parts = host.split([tokens, tokens, len(cu), len(self.host_k), len(out_rows), len(self.host_out_k)])
        for buffer, values in zip((self.positions[:tokens], self.slots[:tokens], self.cu_seqlens_q, self.seqlens_k,
                                   self.output_rows, self.output_lens), parts):
            buffer.copy_(values)
        ids_t = torch.tensor(ids, dtype=torch.int64).to(self.embeds.device)
        self.embeds[:real].copy_(self.model.embed_inputs(ids_t, image_embeds))
        self.embeds[real:tokens].zero_()
        self.tables[:n, :self.max_blocks].copy_(block_tables.gather(rows, self.max_blocks))
        self.tables[n:self.max_seqs, 0] = self.scratch_block
        self.graphs[tokens].replay()
        return self.head.logits[:n], self.head.tokens[:n]
