"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Policy (after nano-vllm): prefill first. A step is either all prefill or all decode.
- Prefill: running sequences whose prefill is unfinished continue first (they keep their blocks), then waiting
  sequences are admitted FIFO while the number of running sequences, the token budget and the free blocks allow.
  A prompt longer than the remaining budget is chunked: it gets what is left, and continues next step.
- Decode, when no prefill was possible: one token for every running sequence. A sequence whose next token needs a
  block when none is free preempts the latest-admitted running sequence (its blocks are freed, it goes to the
  front of the queue and is later recomputed as a prefill over its prompt and generated tokens); if it is the
  only one left, it preempts itself.

Failure isolation: when a step raises, the engine calls quarantine(out): the step's sequences give back their
blocks (their K/V is recomputed) and become suspects. While suspects exist, each step runs one suspect alone,
through its recompute prefill and one decode step; one that fails alone is the culprit and the engine fails
only it. The others rejoin the batch.

One step, as the engine drives it:
    out = scheduler.schedule()
    sampled = runner.run(out)            # a token for each seq where out.needs_sample[i], else None
    scheduler.postprocess(out, sampled)  # advance num_cached_tokens, register full blocks, append tokens
    ... engine checks eos / max_tokens / stop strings and calls scheduler.finish(seq, reason)
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bunny_backend.engine.block_manager import BlockManager
from bunny_backend.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    is_prefill: bool = False
    # Per seq: tokens computed this step, token_ids[seq.num_cached_tokens : seq.num_cached_tokens + n].
    num_new_tokens: list[int] = field(default_factory=list)
    # Per seq: whether this step reaches its last token, so the last row's logits are sampled.
    needs_sample: list[bool] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config, block_manager: BlockManager, max_model_len: int):
        """config: anything with max_num_seqs and max_num_batched_tokens (EngineConfig)."""
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
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

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # -- scheduling ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = self._schedule_suspect() if self.num_suspects else SchedulerOutput()
        if out.is_empty:
            out = self._schedule_prefill()
        if out.is_empty:
            out = self._schedule_decode()
        out.needs_sample = [s.num_cached_tokens + n == s.num_tokens for s, n in zip(out.seqs, out.num_new_tokens)]
        return out

    def _schedule_prefill(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=True)
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if budget == 0:
                return out
            if not seq.is_prefill_done:
                n = min(seq.num_tokens - seq.num_cached_tokens, budget)
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self._admit(seq)
            n = min(seq.num_tokens - seq.num_cached_tokens, budget)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _admit(self, seq: Sequence) -> None:
        """From waiting to running, with blocks for its prompt (the caller checked can_allocate)."""
        self.block_manager.allocate(seq)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _schedule_decode(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=False)
        limit = min(self.max_num_seqs, self.max_num_batched_tokens)
        while self.running and len(out.seqs) < limit:
            seq = self.running.popleft()
            assert seq.is_prefill_done, f"{seq} reached decode with its prefill unfinished"
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                out.seqs.append(seq)
                out.num_new_tokens.append(1)
        self.running.extendleft(reversed(out.seqs))
        return out

    def _schedule_suspect(self) -> SchedulerOutput:
        """One suspect alone: admitted first if need be (the latest-admitted running sequences make room)."""
        seq = next((s for s in self.running if s.suspect), None)
        if seq is None:
            seq = next(s for s in self.waiting if s.suspect)
            while self.running and (len(self.running) >= self.max_num_seqs or not self.block_manager.can_allocate(seq)):
                self._preempt(self.running.pop())
            if not self.block_manager.can_allocate(seq):
                return SchedulerOutput()   # not reached: check_fits admitted it against the empty cache
            self._admit(seq)
        if not seq.is_prefill_done:
            n = min(seq.num_tokens - seq.num_cached_tokens, self.max_num_batched_tokens)
            return SchedulerOutput([seq], True, [n])
        while not self.block_manager.can_append(seq):
            victim = next((s for s in reversed(self.running) if s is not seq), None)
            if victim is None:
                return SchedulerOutput()   # not reached, as above
            self.running.remove(victim)
            self._preempt(victim)
        self.block_manager.may_append(seq)
        return SchedulerOutput([seq], False, [1])

    def quarantine(self, out: SchedulerOutput) -> None:
        """The step `out` raised: its sequences give back their blocks and will each be retried alone."""
        failed = [seq for seq in out.seqs if seq.status == SequenceStatus.RUNNING]
        for seq in failed:
            self.running.remove(seq)
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            seq.num_quarantines += 1
            if not seq.suspect:
                seq.suspect = True
                self.num_suspects += 1
        self.waiting.extendleft(reversed(failed))

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the forward ---------------------------------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput, sampled: list[int | None]) -> None:
        """Record a finished step: sampled[i] is the token drawn for out.seqs[i] (None where not needs_sample)."""
        if len(sampled) != len(out.seqs):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(out.seqs)} scheduled sequences")
        for seq, n, want, token in zip(out.seqs, out.num_new_tokens, out.needs_sample, sampled):
            if seq.status != SequenceStatus.RUNNING:
                continue        # aborted (or preempted) while the step ran: its blocks are gone
            if want != (token is not None):
                raise ValueError(f"{seq}: needs_sample={want} but sampled={token}")
            seq.num_cached_tokens += n
            self.block_manager.seal_full_blocks(seq)
            if token is not None:
                seq.append_token(token)
            if seq.suspect and not out.is_prefill:   # it has now prefilled and decoded alone
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
