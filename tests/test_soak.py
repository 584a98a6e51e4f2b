"""Reliability under load on the shared server: a mixed soak, and a storm of cancellations.

Greedy (and seeded) outputs of one prompt must be prefixes of one another whatever the batch they ran in, every
request must end with a final response or a stated error, and afterwards no KV block may stay in use.
"""
from __future__ import annotations

import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fault_injection
from grpc_helpers import TEXTS, error_kind, inputs_of, joined, send_raw
from reliability_report import record
from server_fixture import rss_bytes, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]
BAD = [dict(top_p=0.0), dict(max_tokens=0), dict(temperature=-1.0)]   # each answered with INVALID_ARG


def mixed_request(rng: random.Random, n_images: int):
    """-> (inputs, key or None, expect_error). key groups requests whose outputs must be prefixes of each other."""
    text, image = rng.randrange(len(TEXTS)), rng.choice([None, *range(n_images)])
    kw = dict(max_tokens=rng.randint(1, 128), ignore_eos=True, stream=rng.random() < 0.5)
    if rng.random() < 0.05:
        return dict(text=TEXTS[text], **{**kw, **rng.choice(BAD)}), None, True
    if rng.random() < 0.4:
        seed = rng.choice([1, 2])
        kw.update(temperature=0.8, top_p=0.9, seed=seed)
        return dict(text=TEXTS[text], image=image, **kw), (text, image, seed), False
    return dict(text=TEXTS[text], image=image, **kw), (text, image, "greedy"), False


def run_one(url, spec, images):
    spec = dict(spec)
    image = spec.pop("image", None)
    t0 = time.monotonic()
    responses, error = send_raw(url, inputs_of(images=[images[image]] if image is not None else [], **spec),
                                timeout=120)   # queue.Empty (a hang) fails the test
    return responses, error, time.monotonic() - t0


def assert_prefix_consistent(outputs: dict) -> int:
    """outputs: key -> list of id lists. Returns how many groups had more than one request."""
    groups = 0
    for key, runs in outputs.items():
        runs = sorted(runs, key=len)
        groups += len(runs) > 1
        for short, long in zip(runs, runs[1:]):
            assert long[:len(short)] == short, f"{key}: {short} is not a prefix of {long}"
    return groups


def test_soak_200_mixed_requests_from_16_clients(bunny_server, test_images):
    rng = random.Random(2026)
    specs = [mixed_request(rng, len(test_images)) for _ in range(200)]
    stub = bunny_server.stub_pid()
    outputs, kinds, rss, slowest = collections.defaultdict(list), collections.Counter(), [], 0.0
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for half in (specs[:100], specs[100:]):
            results = list(pool.map(lambda s: run_one(bunny_server.url, s[0], test_images), half))
            for (spec, key, expect_error), (responses, error, wall) in zip(half, results):
                kinds[error_kind(error)] += 1
                slowest = max(slowest, wall)
                if expect_error:
                    assert error is not None and "must" in str(error) and responses == [], (spec, error)
                    continue
                assert error is None, (spec, str(error))
                assert responses and responses[-1]["final"] and responses[-1]["reason"] == "length", spec
                ids = joined(responses)[1]
                assert len(ids) == spec["max_tokens"] == responses[-1]["completion"]
                outputs[key].append(ids)
            # measured with nothing in flight (the gauges at zero), so that requests still being torn down on a
            # slow machine do not count as growth
            bunny_server.wait_until_idle()
            rss.append(rss_bytes(stub))
    groups = assert_prefix_consistent(outputs)
    idle = bunny_server.wait_until_idle()
    growth = (rss[1] - rss[0]) / 2**20
    record("soak", requests=len(specs), clients=16, by_outcome=dict(kinds), prefix_groups_checked=groups,
           wall_s=round(time.monotonic() - t0, 1), slowest_request_s=round(slowest, 1),
           stub_rss_mb=[round(r / 2**20) for r in rss], rss_growth_second_half_mb=round(growth, 1), after=idle)
    assert not any(idle.values()), f"not idle after the soak: {idle}"
    assert growth < 32, f"the stub's RSS grew {growth:.1f} MiB over the second 100 requests"


def cancelled_on_server(server) -> float:
    return server.metric("bunny_requests_total", finish_reason="cancelled")


def wait_for_cancelled(server, before: float, want: int) -> int:
    """The server's count of cancelled requests since `before`, once it reaches `want` (or after 30 s)."""
    deadline = time.monotonic() + 30
    while cancelled_on_server(server) - before < want and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)   # a count that goes on past `want` shows here
    return int(cancelled_on_server(server) - before)


def test_cancellation_storm_leaves_the_others_untouched(bunny_server):
    """50 streams that cannot finish on their own (400 tokens, every step with one of them 0.1 s slower: 40 s and
    more) are cancelled by their clients at random moments, queued, in prefill or mid-stream: the server must cancel
    exactly those 50, free their blocks, and leave six witnesses' tokens unchanged."""
    witnesses = [inputs_of(TEXTS[i], stream=True, max_tokens=60, ignore_eos=True) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        calm = [joined(r[0]) for r in pool.map(lambda x: send_raw(bunny_server.url, x), witnesses)]
    cancelled_before = cancelled_on_server(bunny_server)
    rng = random.Random(7)
    storm = [(inputs_of(f"{TEXTS[i % len(TEXTS)]} {fault_injection.SLOW_MARKER}", stream=rng.random() < 0.7,
                        max_tokens=400, ignore_eos=True), rng.uniform(0.3, 1.5)) for i in range(50)]
    with ThreadPoolExecutor(22) as pool:
        witness_futures = [pool.submit(send_raw, bunny_server.url, x) for x in witnesses]
        storm_results = list(pool.map(lambda s: send_raw(bunny_server.url, s[0], cancel_after_s=s[1]), storm))
        stormy = [f.result() for f in witness_futures]
    assert all(error is None for _, error in stormy)
    assert [joined(r) for r, _ in stormy] == calm
    by_test = sum(error == "cancelled by the test" for _, error in storm_results)
    assert by_test == len(storm), [str(e) for _, e in storm_results if e != "cancelled by the test"]
    cancelled = wait_for_cancelled(bunny_server, cancelled_before, by_test)
    idle = bunny_server.wait_until_idle()
    record("cancellation storm", streams=len(storm), cancelled_by_client=by_test, cancelled_on_server=cancelled,
           witnesses_unchanged=len(stormy), after=idle)
    assert not any(idle.values()), f"not idle after the storm: {idle}, {cancelled} cancelled on the server\n" \
                                   f"{bunny_server.thread_stacks()}"
    assert cancelled == by_test


def test_cancelling_queued_and_mid_prefill_requests(bunny_server, tiny_checkpoint):
    """A request cancelled while it waits in the queue, and one cancelled in the middle of its chunked prefill, end on
    the server as cancelled (its count equals the client's), never send a token, and give back every KV block."""
    from bunny_backend.io.tokenizer import load_tokenizer

    url, slow = bunny_server.url, dict(stream=True, max_tokens=400, ignore_eos=True)
    cancelled_before = cancelled_on_server(bunny_server)
    stop_holders, first_token = threading.Event(), threading.Event()
    tokenizer = load_tokenizer(tiny_checkpoint)
    words = []
    while len(tokenizer.encode(" ".join(words))) < 1400:
        words += TEXTS[len(words) % len(TEXTS)].split() + ["and", "then"]
    long_prompt = " ".join(words)
    with ThreadPoolExecutor(24) as pool:
        # Mid-prefill: one slow stream decodes (its first token out, so the CPU spreads a newcomer's prompt over
        # steps of at most 128 tokens, each 0.1 s slower): a 1400-token prompt then spends 1.1 s and more in prefill
        # (its 400 tokens more stay within the tiny model's 2048).
        holders = [pool.submit(send_raw, url, inputs_of(f"Hold 0. {fault_injection.SLOW_MARKER}", **slow),
                               cancel_event=stop_holders, on_response=lambda r: first_token.set())]
        assert first_token.wait(60), "the holder's first token never came"
        stop_prefill, long_tokens = threading.Event(), []
        long = pool.submit(send_raw, url, inputs_of(long_prompt, **slow), cancel_event=stop_prefill,
                           on_response=long_tokens.append)
        wait_for(lambda: long.done() or bunny_server.metric("bunny_num_requests_running") == 2, 30,
                 "the long prompt not admitted", poll_s=0.02)
        assert not long.done(), long.result()
        assert long_tokens == [], "the long prompt's prefill ended before the test could cancel it"
        stop_prefill.set()
        responses, error = long.result()
        assert error == "cancelled by the test" and responses == []   # in prefill: admitted, no token yet
        # Queued: 16 running streams fill max_num_seqs; three more wait, and are cancelled there.
        holders += [pool.submit(send_raw, url, inputs_of(f"Hold {i}. {fault_injection.SLOW_MARKER}", **slow),
                                cancel_event=stop_holders) for i in range(1, 16)]
        wait_for(lambda: bunny_server.metric("bunny_num_requests_running") == 16, 30, "16 holders not running",
                 poll_s=0.05)
        stop_queued = threading.Event()
        queued = [pool.submit(send_raw, url, inputs_of(f"Queued {i}.", **slow), cancel_event=stop_queued)
                  for i in range(3)]
        wait_for(lambda: bunny_server.metric("bunny_num_requests_waiting") == 3, 30, "3 requests not queued",
                 poll_s=0.05)
        stop_queued.set()
        assert [f.result() for f in queued] == [([], "cancelled by the test")] * 3
        wait_for(lambda: bunny_server.metric("bunny_num_requests_waiting") == 0, 30, "the queue not emptied",
                 poll_s=0.05)
        assert bunny_server.metric("bunny_num_requests_running") == 16   # the holders go on
        stop_holders.set()
        assert all(f.result()[1] == "cancelled by the test" for f in holders)
    by_test = 1 + 3 + len(holders)
    cancelled = wait_for_cancelled(bunny_server, cancelled_before, by_test)
    idle = bunny_server.wait_until_idle()
    record("cancel queued and mid-prefill", cancelled_by_client=by_test, cancelled_on_server=cancelled, after=idle)
    assert cancelled == by_test and not any(idle.values()), (cancelled, idle)
