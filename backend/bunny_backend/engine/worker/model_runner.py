"""Runs one scheduled step: packs the sequences' tokens (decodes and prefill chunks in one flat batch), sets the
attention context, runs the model, samples. On CUDA, decode steps replay decode_graphs.py's graphs and the other
steps mixed_graphs.py's; both end in the LM head and greedy argmax, whose tokens a step of plain greedy rows takes
as they are (anything else samples from the graph's logits).

Under tensor parallelism (engine/executor/tp_group.py) rank 0's runner packs the step, hands it to the other ranks, and all
of them run `forward` on it; rank 0 alone samples. Each rank's KV cache holds that rank's KV heads.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import torch

from bunny_backend.engine.worker.block_tables import BlockTables
from bunny_backend.engine.worker.decode_graphs import DecodeGraphs
from bunny_backend.engine.worker.graph_capture import LogitsHead
from bunny_backend.engine.worker.mixed_graphs import MixedGraphs
from bunny_backend.engine.outputs import EngineDeadError, TokenLogprobs
from bunny_backend.engine.core.scheduler import SchedulerOutput
from bunny_backend.engine.core.sequence import Sequence
from bunny_backend.engine.executor.step_channel import StepInputs
from bunny_backend.engine.structured_output import TokenMask
from bunny_backend.model.bunny import BunnyForCausalLM
from bunny_backend.ops.sampler import Sampler, SamplerOutput, takes_raw_argmax
from bunny_backend.utils.context import paged_context, reset_context, set_context, token_slots


log = logging.getLogger("bunny.engine")


@dataclass(slots=True)
class Packed:
    """One step's flat inputs as host lists, decodes first: what the eager context and the mixed graphs are made of."""
    ids: list[int]
    positions: list[int]
    slots: list[int]
    seqlens_q: list[int]
    seqlens_k: list[int]
    image_embeds: torch.Tensor | None
    finals: list[bool]   # the sequence's last new row makes logits (a decode, or the end of its prompt)


@dataclass(slots=True)
class Sampled:
    """One step's sampled tokens, per scheduled sequence: None where a prefill chunk did not reach the end; and
    the token's logprobs where the sequence asked for them (else None)."""
    tokens: list[int | None]
    logprobs: list[TokenLogprobs | None]


class ModelRunner:
    def __init__(self, model: BunnyForCausalLM, backend, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, graph_capture=None, max_graph_batch: int = 0,
                 max_blocks_per_seq: int = 0, max_graph_tokens: int = 0, workers=None,
                 eos_token_ids: Collection[int] = ()):
        """graph_capture (graph_capture.GraphCapture, or another capture(fn) -> Captured): capture decode steps of up
        to max_graph_batch sequences with block tables of up to max_blocks_per_seq blocks, and, when
        max_graph_tokens (the step token budget) is given, the other steps up to that many tokens over as many
        sequences; None runs eagerly.
        workers: rank 0's tp_group.WorkerGroup under tensor parallelism, else None. eos_token_ids: what a
        sequence may not sample before its min_tokens (unless it ignores EOS)."""
        self.model, self.backend, self.workers = model, backend, workers
        self.eos_token_ids = tuple(eos_token_ids)
        self.device, self.dtype = device, dtype
        self.block_size, self.num_blocks = block_size, num_blocks
        self.sampler = Sampler()
        self.kv_caches = []
        allocated = num_blocks + (graph_capture is not None)   # the graphs' scratch block comes last
        for layer in model.model.layers:
            attn = layer.self_attn.attn   # this rank's heads
            k_cache, v_cache = backend.allocate_kv_cache(allocated, block_size, attn.num_kv_heads, attn.head_dim,
                                                         dtype, device)
            attn.k_cache, attn.v_cache, attn.backend = k_cache, v_cache, backend
            self.kv_caches.append((k_cache, v_cache))
        # max_blocks_per_seq is 0 on tensor-parallel workers, which never pack a step
        self.block_tables = BlockTables(max_blocks_per_seq or num_blocks, device, rows=2 * max(16, max_graph_batch))
        self.graphs = self.mixed_graphs = None
        if graph_capture is not None:
            self._capture(graph_capture, max_graph_batch, max_blocks_per_seq, max_graph_tokens)

    def _capture(self, capture, max_batch: int, max_blocks: int, max_tokens: int) -> None:
        weight = self.model.model.embed_tokens.weight
        try:
            head = LogitsHead(self.model, max_batch + 1, weight.shape[1], weight.dtype, self.device)
            t0 = time.perf_counter()
            self.graphs = DecodeGraphs(self.model, head, max_batch, max_blocks, self.num_blocks, self.block_size,
                                       self.device, capture)
            log.info("bunny: decode graphs captured for batch sizes %s in %.1f s", self.graphs.sizes,
                     time.perf_counter() - t0)
            if max_tokens:
                t0 = time.perf_counter()
                self.mixed_graphs = MixedGraphs(self.model, head, max_tokens, max_batch, max_blocks, self.num_blocks,
                                                self.block_size, self.device, capture)
                log.info("bunny: mixed-step graphs captured for token counts %s over %d sequences in %.1f s",
                         self.mixed_graphs.sizes, max_batch, time.perf_counter() - t0)
        except Exception as e:   # noqa: BLE001 - eager steps still work
            log.warning("bunny: capturing CUDA graphs failed (%s: %s); running %s eagerly", type(e).__name__, e,
                        "decode steps" if self.graphs is None else "steps that prefill")

    # ---- inputs --------------------------------------------------------------------------------------------
    def _image_rows(self, seq: Sequence, start: int, end: int) -> list[torch.Tensor]:
        rows = []
        for img in seq.images:
            lo, hi = max(start, img.offset), min(end, img.offset + img.length)
            if lo < hi:
                if img.embeds is None:
                    raise RuntimeError(f"{seq}: image at {img.offset} has no features (the encoder phase did not run)")
                rows.append(img.embeds[lo - img.offset:hi - img.offset])
        return rows

    def _pack(self, seqs: list[Sequence], num_new: list[int]) -> Packed:
        """Flat inputs of one step: decodes (one row each) first, then prefill chunks."""
        ids, positions, slots, rows = [], [], [], []
        starts = [s.num_cached_tokens for s in seqs]
        for seq, start, n in zip(seqs, starts, num_new):
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += token_slots(seq.block_table, start, start + n, self.block_size)
            rows += self._image_rows(seq, start, start + n)
        return Packed(ids, positions, slots, list(num_new), [a + n for a, n in zip(starts, num_new)],
                      torch.cat(rows) if rows else None,
                      [a + n == s.num_tokens for s, a, n in zip(seqs, starts, num_new)])

    def _decode_lists(self, seqs: list[Sequence]):
        ids = [s.last_token for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [token_slots(s.block_table, p, p + 1, self.block_size)[0] for s, p in zip(seqs, positions)]
        return ids, positions, slots, [s.num_tokens for s in seqs]

    # ---- step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> Sampled:
        """One forward over the step's decodes and prefill chunks (image features already filled in by the
        encoder phase), and the sampled tokens."""
        seqs = step.seqs
        width = max(len(s.block_table) for s in seqs)
        if step.num_decodes == len(seqs) and self.graphs is not None and self.graphs.can_run(len(seqs), width):
            logits, tokens = self.graphs.run(*self._decode_lists(seqs), self.block_tables, self.block_tables.rows(seqs))
            return self._choose(logits, tokens, seqs, list(range(len(seqs))))
        packed = self._pack(seqs, step.num_new_tokens)
        want = [i for i, final in enumerate(packed.finals) if final]
        if self.mixed_graphs is not None and self.mixed_graphs.can_run(len(seqs), len(packed.ids), width):
            logits, tokens = self.mixed_graphs.run(packed.ids, packed.positions, packed.slots, packed.seqlens_q,
                                                   packed.seqlens_k, packed.image_embeds, self.block_tables,
                                                   self.block_tables.rows(seqs))
            return self._choose(logits, tokens, seqs, want)
        tables = self.block_tables.gather(self.block_tables.rows(seqs), width)
        ctx = paged_context(packed.seqlens_q, packed.seqlens_k, tables,
                            torch.tensor(packed.slots, dtype=torch.int64, device=self.device), step.num_decodes,
                            finals=packed.finals)
        ends = list(itertools.accumulate(packed.seqlens_q))
        inputs = StepInputs(torch.tensor(packed.ids, dtype=torch.int64, device=self.device),
                            torch.tensor(packed.positions, dtype=torch.int64, device=self.device), ctx,
                            [ends[i] - 1 for i in want], packed.image_embeds)
        logits = self.execute(inputs)
        if not want:
            return Sampled([None] * len(seqs), [None] * len(seqs))
        return self._sample(logits, seqs, want)

    def execute(self, step: StepInputs) -> torch.Tensor | None:
        """Run one step on every rank; rank 0's logits of step.logit_rows (None when it has none)."""
        if self.workers is None:
            return self.forward(step)
        # What could fail alone on a rank is checked before the other ranks see the step.
        self.model.check_image_rows(step.input_ids, step.image_embeds)
        self.workers.send(step)   # EngineDeadError once a worker died
        try:
            return self.forward(step)
        except Exception as e:   # the other ranks may be inside this step's collectives: they cannot go on
            raise EngineDeadError(self.workers.fail(e)) from e

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor | None:
        """Every rank: the model over one step; the logits of step.logit_rows on rank 0 (None elsewhere)."""
        set_context(step.context)
        try:
            hidden = self.model(self.model.embed_inputs(step.input_ids, step.image_embeds), step.positions)
        finally:
            reset_context()
        if not step.logit_rows:
            return None
        if step.context.output_rows is None:   # else the model gave the output rows only, which are these
            hidden = hidden[step.logit_rows]
        return self.model.compute_logits(hidden)

    def _banned(self, seq: Sequence) -> Collection[int]:
        """What seq may not sample now: EOS before its min_tokens (unless it ignores EOS)."""
        return (self.eos_token_ids if seq.num_completion_tokens < seq.params.min_tokens and not seq.params.ignore_eos
                else ())

    def _choose(self, logits: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence], want: list[int]) -> Sampled:
        """A graph's step: logits[i] and their argmax tokens[i] belong to seqs[i]; seqs[want] get a token. Plain
        greedy rows take the graph's argmax; any other row sends the wanted rows through the sampler."""
        out = Sampled([None] * len(seqs), [None] * len(seqs))
        if not want:
            return out
        if all(seqs[i].grammar is None and takes_raw_argmax(seqs[i].params, self._banned(seqs[i])) for i in want):
            chosen = tokens.tolist()
            for i in want:
                out.tokens[i] = chosen[i]
            return out
        rows = logits if len(want) == len(seqs) else logits[torch.tensor(want, device=logits.device)]
        return self._sample(rows, seqs, want)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], want: list[int]) -> Sampled:
        """logits[j] belongs to seqs[want[j]]; the others get None."""
        picked = [seqs[i] for i in want]
        banned = [self._banned(s) for s in picked]
        mask = TokenMask.for_batch([s.grammar for s in picked], logits.shape[-1])
        sampled = self.sampler(logits, [s.params for s in picked], [s.generator for s in picked],
                               [s.token_ids for s in picked], [s.num_prompt_tokens for s in picked], banned, mask)
        out = Sampled([None] * len(seqs), [None] * len(seqs))
        for i, t in zip(want, sampled.tokens.tolist()):
            out.tokens[i] = t
        for i, lp in zip(want, _token_logprobs(sampled, picked)):
            out.logprobs[i] = lp
        return out


def _token_logprobs(sampled: SamplerOutput, seqs: list[Sequence]) -> list[TokenLogprobs | None]:
    """Per sampled row: its logprobs, with the top list cut to what its sequence asked for; None if it did not ask."""
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    lp = sampled.logprobs
    if lp is None:
        return out
    for row, chosen, ids, values in zip(lp.rows, lp.chosen.tolist(), lp.top_ids.tolist(), lp.top_logprobs.tolist()):
        k = seqs[row].params.logprobs
        out[row] = TokenLogprobs(chosen, ids[:k], values[:k])
    return out
