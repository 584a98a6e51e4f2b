"""Reliability under load on the shared server: a mixed soak, and a storm of cancellations.

Greedy (and seeded) outputs of one prompt must be prefixes of one another whatever the batch they ran in, every
request must end with a final response or a stated error, and afterwards no KV block may stay in use.
"""
from __future__ import annotations

import collections
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpc_helpers import TEXTS, error_kind, inputs_of, joined, send_raw
from reliability_report import record
from server_fixture import rss_bytes

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
            rss.append(rss_bytes(stub))
    groups = assert_prefix_consistent(outputs)
    idle = bunny_server.wait_until_idle()
    growth = (rss[1] - rss[0]) / 2**20
    record("soak", requests=len(specs), clients=16, by_outcome=dict(kinds), prefix_groups_checked=groups,
           wall_s=round(time.monotonic() - t0, 1), slowest_request_s=round(slowest, 1),
           stub_rss_mb=[round(r / 2**20) for r in rss], rss_growth_second_half_mb=round(growth, 1), after=idle)
    assert not any(idle.values()), f"not idle after the soak: {idle}"
    assert growth < 32, f"the stub's RSS grew {growth:.1f} MiB over the second 100 requests"


def test_cancellation_storm_leaves_the_others_untouched(bunny_server):
    witnesses = [inputs_of(TEXTS[i], stream=True, max_tokens=60, ignore_eos=True) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        calm = [joined(r[0]) for r in pool.map(lambda x: send_raw(bunny_server.url, x), witnesses)]
    cancelled_before = bunny_server.metric("bunny_requests_total", finish_reason="cancelled")
    rng = random.Random(7)
    storm = [(inputs_of(TEXTS[i % len(TEXTS)], stream=rng.random() < 0.7, max_tokens=400, ignore_eos=True),
              rng.uniform(0.0, 1.5)) for i in range(50)]
    with ThreadPoolExecutor(22) as pool:
        witness_futures = [pool.submit(send_raw, bunny_server.url, x) for x in witnesses]
        storm_results = list(pool.map(lambda s: send_raw(bunny_server.url, s[0], cancel_after_s=s[1]), storm))
        stormy = [f.result() for f in witness_futures]
    assert all(error is None for _, error in stormy)
    assert [joined(r) for r, _ in stormy] == calm
    by_test = sum(error == "cancelled by the test" for _, error in storm_results)
    idle = bunny_server.wait_until_idle()
    cancelled = bunny_server.metric("bunny_requests_total", finish_reason="cancelled") - cancelled_before
    record("cancellation storm", streams=len(storm), cancelled_by_client=by_test, cancelled_on_server=int(cancelled),
           witnesses_unchanged=len(stormy), after=idle)
    assert not any(idle.values()), f"not idle after the storm: {idle}, {cancelled:.0f} cancelled on the server\n" \
                                   f"{bunny_server.thread_stacks()}"
    assert 0 < by_test and cancelled <= by_test
