"""The CPU engine's thread governor (engine/worker/cpu_threads.py) against a simulated host whose best thread count
is known: a step's time is its work divided over the threads that get a core, and when any thread shares its core
with a busy neighbour, the whole step waits at the barrier for that thread's time slices."""
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from engine_helpers import QUESTIONS, make_engine, run_all

from bunny_backend.config import EngineConfig
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker.cpu_threads import ThreadGovernor, results_ignore_thread_count, thread_governor
from bunny_backend.engine.worker.device import DevicePlan
from bunny_backend.ops import cpu_kernels

CORES = 4
DECODE = (1, 1, 1)   # one sequence decoding one token


class Host:
    """Step time of `threads` threads on CORES cores of which `busy` run another process."""

    def __init__(self, work=8e-3):
        self.work, self.busy, self.now, self.threads = work, 0, 0.0, CORES

    def set_threads(self, n: int) -> None:
        self.threads = n

    def step_time(self) -> float:
        free = CORES - self.busy
        if self.threads <= free:
            return self.work / self.threads
        return self.work / self.threads + 30e-3   # a descheduled thread holds everyone at the barrier


def serve(gov: ThreadGovernor, host: Host, steps: int, shapes=(DECODE,)) -> list[int]:
    """Run `steps` steps cycling over `shapes`; the thread count of each step."""
    seen = []
    for i in range(steps):
        shape = shapes[i % len(shapes)]
        gov.before_step(shape)
        t = host.step_time()
        seen.append(host.threads)
        host.now += t
        gov.after_step(shape, t)
    return seen


def governed(host: Host) -> ThreadGovernor:
    return ThreadGovernor(CORES, CORES, host.set_threads, clock=lambda: host.now)


def test_a_quiet_host_keeps_every_core():
    host = Host()
    gov = governed(host)
    counts = serve(gov, host, 5000)   # ~10 s of steps: several trials, each losing
    assert gov.threads == CORES
    assert counts.count(CORES) > 0.98 * len(counts)   # trials cost a few steps only


@pytest.mark.parametrize("busy", [1, 2, 3])
def test_a_busy_neighbour_is_found_and_left_when_it_goes(busy):
    host = Host()
    gov = governed(host)
    serve(gov, host, 1000)
    host.busy = busy
    serve(gov, host, 2000)
    assert gov.threads == CORES - busy, "the fastest count beside `busy` busy cores"
    host.busy = 0
    serve(gov, host, 30000)   # trials up are spaced out while the count keeps winning: give them time
    assert gov.threads == CORES


def test_a_trial_compares_steps_of_one_shape_only():
    """Big prefill steps interleaved with decodes must not be taken for a slow thread count."""
    host = Host()
    gov = governed(host)
    times = {DECODE: 1.0, (0, 1, 500): 40.0}

    def step_time():
        return times[shape] * 1e-3 * CORES / host.threads

    for i in range(4000):
        shape = DECODE if i % 3 else (0, 1, 500)
        gov.before_step(shape)
        t = step_time()
        host.now += t
        gov.after_step(shape, t)
    assert gov.threads == CORES


def test_the_plan_says_when_threads_adapt(monkeypatch):
    assert thread_governor(DevicePlan.resolve(EngineConfig(device="cpu", num_threads=2))) is None   # asked: fixed
    assert thread_governor(DevicePlan.resolve(EngineConfig(device="cpu", tensor_parallel_size=2))) is None
    plan = DevicePlan.resolve(EngineConfig(device="cpu", dtype="float32"))
    gov = thread_governor(plan)
    if torch.get_num_threads() >= 2 and results_ignore_thread_count(torch.float32):
        assert gov is not None and gov.threads == gov.max_threads == (plan.num_threads or torch.get_num_threads())
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")   # the portable path: results would depend on the count
    assert thread_governor(plan) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_where_threads_adapt_the_results_are_the_same_bits_at_any_count(tiny_checkpoint, test_images, dtype):
    """The governor changes the count between steps: the logits of every step (prefill with an image, chunks,
    decodes) must not change with it."""
    if not results_ignore_thread_count(getattr(torch, dtype)):
        pytest.skip(f"the CPU kernels do not run {dtype} here: the governor stays off")

    def logits_at(threads):
        torch.set_num_threads(threads)
        engine = make_engine(tiny_checkpoint, dtype=dtype, num_threads=threads)
        seen, compute = [], engine.model.compute_logits
        engine.model.compute_logits = lambda hidden: seen.append(compute(hidden).clone()) or seen[-1]
        run_all(engine, [(0, "a", QUESTIONS[0], [test_images[0]], SamplingParams(max_tokens=8, ignore_eos=True)),
                         (1, "b", QUESTIONS[1], [], SamplingParams(max_tokens=8, ignore_eos=True))])
        return seen

    def on_own_thread(threads):   # OpenMP's count is per thread: leave the test's own as it was
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(logits_at, threads).result()

    one, two = on_own_thread(1), on_own_thread(2)
    assert len(one) == len(two) > 4
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_probing_up_beside_a_busy_neighbour_costs_one_stalled_step_a_trial():
    host = Host()
    gov = governed(host)
    serve(gov, host, 1000)
    host.busy = 1
    serve(gov, host, 2000)   # found, and settled at the free cores
    assert gov.threads == CORES - 1
    counts = serve(gov, host, 20000)   # ~60 s: the trials up space out to 30 s
    stalled = sum(c > CORES - 1 for c in counts)
    assert 0 < stalled <= 4, f"{stalled} stalled steps: each trial up should end at its first stalled step"


def test_noisy_steps_on_a_quiet_host_do_not_move_it():
    """A server's other threads jitter step times (x0.7-1.4, and one step in 20 three times longer)."""
    rng = random.Random(0)
    host = Host()
    gov = governed(host)
    counts = []
    for i in range(20000):
        gov.before_step(DECODE)
        t = host.step_time() * rng.uniform(0.7, 1.4) * (3 if rng.random() < 0.05 else 1)
        counts.append(host.threads)
        host.now += t
        gov.after_step(DECODE, t)
    assert counts.count(CORES) > 0.98 * len(counts)


def test_a_change_won_in_a_neighbours_lull_is_taken_back_at_its_first_stalled_step():
    host = Host()
    host.threads = 1
    gov = ThreadGovernor(2, 1, host.set_threads, clock=lambda: host.now)   # beside a neighbour, at 1 of 2
    times = {1: 2e-3, 2: 1e-3}   # a lull: 2 threads are faster for now

    def step():
        gov.before_step(DECODE)
        t = times[host.threads]
        host.now += t
        gov.after_step(DECODE, t)

    while gov.threads == 1:
        step()
    times[2] = 50e-3   # the neighbour is back
    step()
    assert gov.threads == 1 and host.threads == 2, "one stalled step at 2 threads, then back to 1"
    step()
    assert host.threads == 1


def test_the_loop_times_whole_step_periods_and_skips_idle_waits():
    """In a server the loop's own work between forwards depends on the count too (its other threads): the
    governor times from one step's start to the next. A wait for work in between is not a step's time."""
    host = Host()
    host.threads = 2
    gov = ThreadGovernor(2, 2, host.set_threads, clock=lambda: host.now)
    forward, between = {2: 0.5e-3, 1: 0.6e-3}, {2: 1.5e-3, 1: 0.2e-3}
    for i in range(5000):
        gov.step_starts(DECODE, host.now)
        host.now += forward[host.threads]
        gov.step_ran(host.now)
        host.now += between[host.threads] + (1.0 if i % 50 == 49 else 0)   # now and then the loop idles
    assert gov.threads == 1


def test_a_wait_for_work_is_not_a_step_time():
    host = Host()
    host.threads = 2
    gov = ThreadGovernor(2, 2, host.set_threads, clock=lambda: host.now)
    for _ in range(3000):
        gov.step_starts(DECODE, host.now)
        host.now += 1e-3
        gov.step_ran(host.now)
        host.now += 0.2 if host.threads == 2 else 0   # (by chance) every 2-thread step is followed by a wait
    assert gov.threads == 2


def test_a_spike_right_after_a_change_down_does_not_undo_it():
    host = Host()
    host.threads = 2
    gov = ThreadGovernor(2, 2, host.set_threads, clock=lambda: host.now)
    times = {2: 50e-3, 1: 2e-3}   # beside a neighbour: 2 threads stall

    def step(t=None):
        gov.before_step(DECODE)
        t = t if t is not None else times[host.threads]
        host.now += t
        gov.after_step(DECODE, t)

    while gov.threads == 2:
        step()
    step(150e-3)   # one slow step at 1 thread (the neighbour's burst)
    step()
    assert host.threads == 1


def test_a_change_down_during_an_earlier_change_ups_probation_ends_that_probation():
    """Up 2 -> 3 in a lull, then the neighbour is back (slow, not stalled, steps at 3 start a trial at once) and the
    trial goes down to 1: a spike at 1 thread must not send it back to 2, the count the earlier probation kept."""
    host = Host()
    host.threads = 2
    gov = ThreadGovernor(4, 2, host.set_threads, clock=lambda: host.now)
    times = {2: 2e-3, 3: 1e-3, 1: 4e-3}   # a lull: 3 threads are faster for now

    def step(t=None):
        gov.before_step(DECODE)
        t = t if t is not None else times[host.threads]
        host.now += t
        gov.after_step(DECODE, t)

    while gov.threads != 3:
        step()
    times.update({3: 3e-3, 1: 1e-3})   # back: 3 slower than twice its median, under twice the old count's
    for _ in range(200):
        step()
        if gov.threads == 1:
            break
    assert gov.threads == 1
    step(20e-3)   # the neighbour's burst, at 1 thread
    assert gov.threads == 1 and host.threads == 1
