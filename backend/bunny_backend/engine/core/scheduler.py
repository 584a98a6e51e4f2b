"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Policy (after vLLM v1): one token budget per step (max_num_batched_tokens), one forward pass.
- Decodes first: one token for every running sequence whose prefill is done, in admission order. A sequence
  whose next token needs a block when none is free preempts the latest-admitted running sequence not yet in this
  step (its blocks are freed, it goes to the front of the queue and is later recomputed as a prefill over its
  prompt and generated tokens); if there is none, it preempts itself.
- Then prefill chunks fill what is left: running sequences whose prefill is unfinished continue first (they keep
  their blocks), then waiting sequences are admitted FIFO while the number of running sequences, the budget and
  the free blocks allow (not in a step that preempted); a waiting sequence most of whose prompt is being
  computed by another's prefill (the same prompt, or the same image) waits for it to enter the prefix cache
  rather than compute it again, and those behind it may pass. A prompt longer than what is left is chunked: it gets
  what is left, and continues next step. While the step carries decodes of streams that were already streaming when
  a prompt arrived, that prompt's tokens are also bounded (all such prompts together): by
  max_prefill_tokens_while_decoding, or PREFILL_TOKENS_PER_DECODE per decode in the step where that is more. So
  running streams are never stalled by a whole long prompt, and each prompt is spread over about
  prefill_chunks_while_decoding steps: its chunk size (at least MIN_CHUNK_BESIDE_DECODES tokens) is fixed from
  what is left of it at the first step it shares with decodes, so short prompts, too, add only a fraction of their
  prefill to the running streams' next gap. Prompts that arrived before any of the decoding streams had its first
  token (a burst of requests sent together, whose first one started alone) are not spread: nobody was streaming
  when they came, and spreading them would only stagger the burst's finish times.
- Images: a chunk that reaches an image without features needs the vision tower first (engine/worker/encoder_runner.py
  runs it before the forward). At most max_images_per_encoder_batch distinct images not in the encoder cache are
  encoded per step; a chunk that would need one more stops just before that image.
The scheduled sequences are ordered decodes first (SchedulerOutput.num_decodes), as the model runner packs them.

Failure isolation: when a step raises, the engine calls quarantine(out): the step's sequences give back their
blocks (their K/V is recomputed) and become suspects. While suspects exist, each step runs one suspect alone,
through its recompute prefill and one decode step; one that fails alone is the culprit and the engine fails
only it. The others rejoin the batch.

One step, as the engine drives it:
    out = scheduler.schedule()
    encoder.run(out.images)              # features for the images this step reaches
    sampled = runner.run(out)            # a token for each seq where out.needs_sample[i], else None
    scheduler.postprocess(out, sampled)  # advance num_cached_tokens, register full blocks, append tokens
    ... engine checks eos / max_tokens / stop strings and calls scheduler.finish(seq, reason)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.core.sequence import ImageSpan, Sequence, SequenceStatus

# Smaller chunks beside decodes would cost more in per-step work than they spare the running streams.
MIN_CHUNK_BESIDE_DECODES = 32
# Beside D decodes a step may carry up to this many prompt tokens per decode, where that is more than the configured
# bound: a prompt token costs about what a decode token does, so such a step costs at most ~5x a decode-only one,
# and only while prompts arrive. 256 streams arriving over gRPC within 0.25 s were otherwise admitted 128 tokens a
# step, over ~35 steps (bench/log/2026-12-05-capacity-cpu-split.md). CUDA's default bound, 2048, is 8 per decode at
# 256 streams.
PREFILL_TOKENS_PER_DECODE = 4


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    # The first num_decodes seqs decode one token each; the rest run prefill chunks.
    num_decodes: int = 0
    # Per seq: tokens computed this step, token_ids[seq.num_cached_tokens : seq.num_cached_tokens + n].
    num_new_tokens: list[int] = field(default_factory=list)
    # Per seq: whether this step reaches its last token, so the last row's logits are sampled.
    needs_sample: list[bool] = field(default_factory=list)
    # Images without features that this step's chunks reach (from the encoder cache or to encode).
    images: list[ImageSpan] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class _Budget:
    tokens: int                       # tokens this step may still carry
    images: int                       # distinct images this step may still encode
    beside_decodes: bool = False      # the step decodes running streams: prompts go in their spread-out chunks
    streaming_since: float | None = None   # the earliest first token of those streams (None: unknown)
    spread_tokens: int = 0            # tokens the spread-out prompts may still add to this step
    hashes: set[bytes] = field(default_factory=set)   # the images already counted this step


class Scheduler:
    def __init__(self, config, block_manager: BlockManager, max_model_len: int, encoder_cache=(),
                 max_prefill_tokens_while_decoding: int = 0, prefill_chunks_while_decoding: int = 1):
        """config: an EngineConfig (max_num_seqs, max_num_batched_tokens, max_images_per_encoder_batch).
        encoder_cache: what `content_hash in encoder_cache` asks (EncoderCache). max_prefill_tokens_while_decoding
        and prefill_chunks_while_decoding: as resolved for the device (DevicePlan); 0 and 1: no bound beyond
        max_num_batched_tokens, no spreading."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding or config.max_num_batched_tokens
        self.prefill_chunks_while_decoding = max(1, prefill_chunks_while_decoding)
        self.max_images_per_encoder_batch = config.max_images_per_encoder_batch
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.encoder_cache = encoder_cache
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()   # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self.num_suspects = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request can never run, or None. Call before add()."""
        bm = self.block_manager
        if num_prompt_tokens < 1:
            return "the prompt is empty"
        if num_prompt_tokens + max_tokens > self.max_model_len:
            return (f"the prompt ({num_prompt_tokens} tokens, image features counted) plus max_tokens ({max_tokens}) "
                    f"is longer than the model's context of {self.max_model_len} tokens")
        # The last sampled token's K/V is never computed; everything before it must fit in the cache at once,
        # else the sequence would preempt itself forever.
        needed = bm.blocks_needed(num_prompt_tokens + max_tokens - 1)
        if needed > bm.num_blocks:
            return (f"the prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {needed} KV-cache "
                    f"blocks but the cache holds {bm.num_blocks} ({bm.num_blocks * bm.block_size} tokens)")
        return None

    def room(self, num_prompt_tokens: int) -> int:
        """The most new tokens a prompt of this length leaves room for: the rest of the context, as far as the
        KV cache holds it (max_tokens absent on the OpenAI API)."""
        bm = self.block_manager
        return min(self.max_model_len - num_prompt_tokens, bm.num_blocks * bm.block_size - num_prompt_tokens + 1)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # -- scheduling ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = self._schedule_suspect() if self.num_suspects else SchedulerOutput()
        if out.is_empty:
            out = SchedulerOutput()
            budget = _Budget(self.max_num_batched_tokens, self.max_images_per_encoder_batch)
            preempted = self._schedule_decodes(out, budget)
            if out.num_decodes:
                budget.beside_decodes = True
                budget.spread_tokens = max(self.max_prefill_tokens_while_decoding,
                                           PREFILL_TOKENS_PER_DECODE * out.num_decodes)
                firsts = [s.first_token_time for s in out.seqs]
                budget.streaming_since = None if None in firsts else min(firsts)
            self._schedule_prefills(out, budget, admit=not preempted)
        out.needs_sample = [s.num_cached_tokens + n == s.num_tokens for s, n in zip(out.seqs, out.num_new_tokens)]
        return out

    def _schedule_decodes(self, out: SchedulerOutput, budget: _Budget) -> bool:
        """One token for each running sequence whose prefill is done; returns whether any was preempted."""
        num_preemptions = self.num_preemptions
        scheduled: set[int] = set()
        limit = min(self.max_num_seqs, budget.tokens)
        for seq in [s for s in self.running if s.is_prefill_done]:
            if len(out.seqs) >= limit:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue        # preempted below to make room for an earlier one
            while not self.block_manager.can_append(seq):
                victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in scheduled),
                              None)
                self._preempt(victim or seq)
                if victim is None:
                    break
            else:
                self.block_manager.may_append(seq)
                out.seqs.append(seq)
                out.num_new_tokens.append(1)
                scheduled.add(seq.seq_id)
        out.num_decodes = len(out.seqs)
        budget.tokens -= out.num_decodes
        return self.num_preemptions > num_preemptions

    def _schedule_prefills(self, out: SchedulerOutput, budget: _Budget, admit: bool) -> None:
        for seq in [s for s in self.running if not s.is_prefill_done]:
            if budget.tokens <= 0:
                return
            self._add_chunk(out, seq, budget)
        if not admit:
            return
        for seq in list(self.waiting):
            if budget.tokens <= 0 or len(self.running) >= self.max_num_seqs:
                return
            if self.block_manager.in_flight_prefix(seq):
                continue        # its prompt is being computed: it takes it from the cache once sealed
            if budget.beside_decodes and budget.spread_tokens <= 0 and not self._arrived_before_streaming(seq, budget):
                return
            if not self.block_manager.can_allocate(seq):
                return
            self._admit(seq)
            self._add_chunk(out, seq, budget)

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, budget: _Budget) -> None:
        """The next prefill chunk of seq within the budget; it stops before an image the budget cannot encode."""
        start = seq.num_cached_tokens
        n = min(seq.num_tokens - start, budget.tokens)
        spread = budget.beside_decodes and not self._arrived_before_streaming(seq, budget)
        if spread:
            if not seq.prefill_chunk:
                per_step = -(-(seq.num_tokens - start) // self.prefill_chunks_while_decoding)
                seq.prefill_chunk = max(MIN_CHUNK_BESIDE_DECODES, per_step)
            n = min(n, seq.prefill_chunk, budget.spread_tokens)
        reached = []
        for img in seq.images:
            if img.offset >= start + n:
                break
            if img.embeds is not None or img.offset + img.length <= start:
                continue
            new = img.content_hash not in budget.hashes and img.content_hash not in self.encoder_cache
            if new and budget.images == 0:
                n = max(img.offset - start, 0)
                break
            if new:
                budget.images -= 1
                budget.hashes.add(img.content_hash)
            reached.append(img)
        if n == 0:
            return              # admitted but waiting for the encoder budget: it continues next step
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.images += reached
        budget.tokens -= n
        if spread:
            budget.spread_tokens -= n

    @staticmethod
    def _arrived_before_streaming(seq: Sequence, budget: _Budget) -> bool:
        """Whether seq came before any stream decoding this step had its first token (times unknown: no)."""
        return (seq.arrival_time is not None and budget.streaming_since is not None
                and seq.arrival_time <= budget.streaming_since)

    def _admit(self, seq: Sequence) -> None:
        """From waiting to running, with blocks for its prompt (the caller checked can_allocate)."""
        self.block_manager.allocate(seq)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _schedule_suspect(self) -> SchedulerOutput:
        """One suspect alone: admitted first if need be (the latest-admitted running sequences make room)."""
        seq = next((s for s in self.running if s.suspect), None)
        if seq is None:
            seq = next(s for s in self.waiting if s.suspect)
            while self.running and (len(self.running) >= self.max_num_seqs or not self.block_manager.can_allocate(seq)):
                self._preempt(self.running[-1])
            if not self.block_manager.can_allocate(seq):
                return SchedulerOutput()   # not reached: check_fits admitted it against the empty cache
            self._admit(seq)
        out = SchedulerOutput()
        if not seq.is_prefill_done:
            self._add_chunk(out, seq, _Budget(self.max_num_batched_tokens, self.max_images_per_encoder_batch))
            return out
        while not self.block_manager.can_append(seq):
            victim = next((s for s in reversed(self.running) if s is not seq), None)
            if victim is None:
                return out         # not reached, as above
            self._preempt(victim)
        self.block_manager.may_append(seq)
        return SchedulerOutput([seq], 1, [1])

    def quarantine(self, out: SchedulerOutput) -> None:
        """The step `out` raised: its sequences give back their blocks and will each be retried alone."""
        failed = [seq for seq in out.seqs if seq.status == SequenceStatus.RUNNING]
        for seq in failed:
            self.running.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.prefill_chunk = 0
            seq.num_quarantines += 1
            if not seq.suspect:
                seq.suspect = True
                self.num_suspects += 1
        self.waiting.extendleft(reversed(failed))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.prefill_chunk = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the forward ---------------------------------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput, sampled: list[int | None]) -> None:
        """Record a finished step: sampled[i] is the token drawn for out.seqs[i] (None where not needs_sample)."""
        if len(sampled) != len(out.seqs):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(out.seqs)} scheduled sequences")
        for i, (seq, n, want, token) in enumerate(zip(out.seqs, out.num_new_tokens, out.needs_sample, sampled)):
            if seq.status != SequenceStatus.RUNNING:
                continue        # aborted (or preempted) while the step ran: its blocks are gone
            if want != (token is not None):
                raise ValueError(f"{seq}: needs_sample={want} but sampled={token}")
            seq.num_cached_tokens += n
            self.block_manager.seal_full_blocks(seq)
            if token is not None:
                seq.append_token(token)
            if seq.suspect and i < out.num_decodes:   # it has now prefilled and decoded alone
                seq.suspect = False
                self.num_suspects -= 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a running sequence (eos, length, stop string, error): free its blocks and drop it."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.suspect:
            seq.suspect = False
            self.num_suspects -= 1

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request wherever it is; returns its sequence, or None if unknown or already finished."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    self.finish(seq, "cancelled")
                    return seq
        return None
