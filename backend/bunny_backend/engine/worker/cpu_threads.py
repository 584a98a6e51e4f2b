"""The CPU engine's thread count, chosen from measured step times while it serves.

OpenMP threads wait for each other at every parallel region's end. When another process takes one of the cores,
the thread sharing it is descheduled for a time slice at a time and the others spin at the barrier: on 2 cores with
one busy, 2 threads decode at ~5% of their quiet rate, 1 thread at ~100% for a small model. Passive waiting
(OMP_WAIT_POLICY=PASSIVE) survives that but costs a quiet machine ~40%, and affinity or a cgroup quota do not see
a neighbour. So the engine measures: now and then it alternates steps of the same shape between its thread count
and another, and keeps the faster (a lower count only when it is clearly faster). Down, it tries half as many,
then a quarter, and so on while those lose (every count above the free cores stalls alike, so one fewer would not
show it); up, one more, up to the host's cores. A few steps in a row much slower than their shape's usual time
start a trial at once (a neighbour arrived); otherwise trials space out (1 s, doubling to 30 s) while they keep
confirming the count.

A trial's samples are steps of the shape it began with (decoding sequences, new tokens), so it compares like with
like; steps of other shapes run at the current count meanwhile. A trial begins only on a shape seen before (so
likely to repeat: in practice a decode step), and one that does not see its shape again soon is dropped.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from bunny_backend.engine.worker.device import DevicePlan
from bunny_backend.ops import cpu_kernels

log = logging.getLogger("bunny.engine")

MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 30.0
SAMPLES = 4          # steps at each count per trial, at least,
SAMPLE_S = 0.02      # and at least this much step time (a demo step of 0.6 ms moves by 2x from step to step)
DECISIVE_SAMPLES = 2
# The other count wins when its median step takes under this share of the current one's. Step times are noisy in a
# server (its other threads; at 256 streams a 1-thread trial beat 2 threads by 0.64x and then ran slower) and a
# wrong move is costly either way: down, a quiet model loses its cores; up, beside a neighbour, every step stalls.
# A neighbour's stall is no subtle thing (2-thread demo steps of 20-160 ms against 1.5-2.4 at one thread).
DOWN_WIN, UP_WIN = 0.5, 0.85
# A trial ends early when the counts are this far apart (over 2 steps each): a probe up beside a busy neighbour
# stalls (a 2-thread demo step took 160 ms against 3), and more such steps cost more than the trial saves.
DECISIVE = 2.0
SLOWDOWN = 2.0       # this many consecutive steps this much slower than their shape's reference start a trial
SLOW_STEPS = 3
MAX_SHAPES = 64
IDLE_GAP_S = 0.05     # more than this from a forward's end to the next step's start: the loop waited for work
PROBATION_STEPS = 32  # steps of the trial's shape after a change up during which one stalled step undoes it
TRIAL_STEPS = 256    # a trial not done within this many steps is dropped
DRIFT = 0.1          # a shape's reference follows its normal steps (contexts grow) at this rate


class ThreadGovernor:
    def __init__(self, max_threads: int, threads: int, set_threads: Callable[[int], None],
                 clock: Callable[[], float] = time.monotonic):
        self.max_threads, self.threads = max_threads, threads
        self._set, self._clock = set_threads, clock
        self._interval = MIN_INTERVAL_S
        self._next_trial = clock() + MIN_INTERVAL_S
        self._trial: _Trial | None = None
        self._down_next = True
        self._divisor = 2   # a trial down tries threads // divisor
        self._reference: OrderedDict[Hashable, float] = OrderedDict()   # shape -> seconds at self.threads
        self._pending: int | None = None   # the count the coming step runs at
        self._applied = threads
        self._slow = 0   # consecutive steps much slower than their shape's reference
        self._probation: tuple[Hashable, int, float, int] | None = None   # shape, old count, its median, steps left
        self._last: tuple[Hashable, float, float | None] | None = None   # the last step: shape, start, end of forward

    def step_starts(self, shape: Hashable, now: float) -> None:
        """The engine loop's side: a step of this shape starts now. What is timed is a step's whole period, to the
        next step's start (its forward and the loop's own work around it: in a server, the 2-thread demo's forward
        was the faster one while its period was not), unless the loop went idle in between."""
        last, self._last = self._last, None
        if last is not None and last[2] is not None and now - last[2] <= IDLE_GAP_S:
            self.after_step(last[0], now - last[1])
        self.before_step(shape)
        self._last = (shape, now, None)

    def step_ran(self, now: float) -> None:
        if self._last is not None:
            self._last = (self._last[0], self._last[1], now)

    def before_step(self, shape: Hashable) -> None:
        """Called before a step of this shape: set the count it runs at."""
        want = self.threads
        if self._trial is None and shape in self._reference and self._clock() >= self._next_trial:
            self._trial = self._start_trial(shape)
        if self._trial is not None:
            self._trial.steps += 1
            if self._trial.steps > TRIAL_STEPS:
                self._drop_trial()
            elif self._trial.shape == shape:
                want = self._trial.next_count()
        self._pending = want
        if want != self._applied:
            self._set(want)
            self._applied = want

    def after_step(self, shape: Hashable, seconds: float) -> None:
        count, self._pending = self._pending, None
        if count is None:
            return
        trial = self._trial
        if trial is not None and trial.shape == shape:
            trial.record(count, seconds)
            if trial.done:
                self._finish(trial)
            return
        if count != self.threads:
            return
        if self._on_probation(shape, seconds):
            return
        ref = self._reference.get(shape)
        if ref is None:
            self._remember(shape, seconds)
        elif seconds > SLOWDOWN * ref:
            self._slow += 1
            if trial is None and self._slow >= SLOW_STEPS:
                self._next_trial = self._clock()
                self._interval = MIN_INTERVAL_S
                self._down_next = True
        else:
            self._slow = 0
            self._remember(shape, ref + DRIFT * (seconds - ref))

    def _on_probation(self, shape: Hashable, seconds: float) -> bool:
        """Just after a change up, one step of the trial's shape that takes DECISIVE times the old count's median
        takes the change back at once (a trial can win in a lull of the neighbour, whose return then stalls every
        step until a trial notices)."""
        if self._probation is None or self._probation[0] != shape:
            return False
        _, old_count, old_median, left = self._probation
        self._probation = None if left <= 1 else (shape, old_count, old_median, left - 1)
        if seconds <= DECISIVE * old_median:
            return False
        log.info("bunny: CPU threads %d -> %d (back: a step took %.2f ms, %.2f ms before the change)",
                 self.threads, old_count, seconds * 1e3, old_median * 1e3)
        self.threads, self._probation = old_count, None
        self._reference.clear()
        self._remember(shape, old_median)
        self._interval = min(MAX_INTERVAL_S, self._interval * 4)
        self._next_trial = self._clock() + self._interval
        return True

    def _drop_trial(self) -> None:
        self._trial = None
        self._next_trial = self._clock() + self._interval

    def _start_trial(self, shape: Hashable) -> "_Trial | None":
        if self.threads // self._divisor < 1:
            self._divisor = 2
        down, up = self.threads // self._divisor, self.threads + 1
        options = [c for c in ((down, up) if self._down_next else (up, down)) if 1 <= c <= self.max_threads]
        self._down_next = not self._down_next
        if not options:
            self._next_trial = float("inf")
            return None
        return _Trial(shape, self.threads, options[0])

    def _finish(self, trial: "_Trial") -> None:
        self._trial = None
        mine, other = trial.medians()
        if other < (DOWN_WIN if trial.other < trial.current else UP_WIN) * mine:
            log.info("bunny: CPU threads %d -> %d (a step of this shape took %.2f ms, now %.2f ms)",
                     self.threads, trial.other, mine * 1e3, other * 1e3)
            # a change down answers stalls: a spike right after must not undo it (nor an earlier change's probation)
            self._probation = ((trial.shape, self.threads, mine, PROBATION_STEPS) if trial.other > trial.current
                               else None)
            self.threads = trial.other
            self._reference.clear()
            self._remember(trial.shape, other)
            self._interval = MIN_INTERVAL_S
            self._divisor = 2
        else:
            self._remember(trial.shape, mine)
            if trial.other < trial.current:
                self._divisor *= 2
            self._interval = min(MAX_INTERVAL_S, self._interval * 2)
        self._next_trial = self._clock() + self._interval

    def _remember(self, shape: Hashable, seconds: float) -> None:
        self._reference[shape] = seconds
        self._reference.move_to_end(shape)
        while len(self._reference) > MAX_SHAPES:
            self._reference.popitem(last=False)


class _Trial:
    """Steps of one shape alternating between the current count and another, SAMPLES of each."""

    def __init__(self, shape: Hashable, current: int, other: int):
        self.shape, self.current, self.other = shape, current, other
        self.times: dict[int, list[float]] = {current: [], other: []}
        self.steps = 0   # every step since it began, of any shape
        self._turn = 0

    def next_count(self) -> int:
        self._turn += 1
        return self.other if self._turn % 2 else self.current

    def record(self, count: int, seconds: float) -> None:
        self.times[count].append(seconds)

    @property
    def done(self) -> bool:
        if not all(len(t) >= DECISIVE_SAMPLES for t in self.times.values()):
            return False
        mine, other = self.medians()
        return (all(len(t) >= SAMPLES and sum(t) >= SAMPLE_S for t in self.times.values())
                or other > DECISIVE * mine or mine > DECISIVE * other)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.times[self.current]), statistics.median(self.times[self.other])


def results_ignore_thread_count(dtype: torch.dtype) -> bool:
    """Whether a step's results are the same bits at any thread count: where the decoder runs on the CPU kernels,
    which split their work over output columns, rows and heads only (tests/test_cpu_threads.py checks the whole
    engine); torch's own matmuls on the portable path split differently by thread count (1.5e-5 apart in float32)."""
    return all(k is not None for k in (cpu_kernels.panel_linear(dtype), cpu_kernels.paged_decode(),
                                       cpu_kernels.decoder_ops()))


def thread_governor(plan: DevicePlan) -> ThreadGovernor | None:
    """The governor of an engine on this plan, or None where its thread count is fixed (or 1), or where changing
    it would change the results (an engine's outputs must not depend on how busy its host was)."""
    threads = plan.num_threads or torch.get_num_threads()
    if not plan.adaptive_threads or threads < 2 or not results_ignore_thread_count(plan.dtype):
        return None
    return ThreadGovernor(threads, threads, torch.set_num_threads)
