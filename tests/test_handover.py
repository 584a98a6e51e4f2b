"""The adapter's handover (stub/handover.py): each request's outputs merged until the responder takes them, against
a naive oracle that keeps every output and concatenates it."""
from __future__ import annotations

import random

import pytest

from bunny_backend.engine.outputs import EngineStats, RequestOutput, TokenLogprobs
from bunny_backend.stub.handover import Handover


def token(rid: str, i: int, final: bool = False, logprobs: bool = False) -> RequestOutput:
    return RequestOutput(rid, delta_text=f"<{rid}:{i}>", delta_token_ids=[i], finished=final,
                         finish_reason="length" if final else None, prompt_tokens=7, completion_tokens=i + 1,
                         ttft_s=0.5 if i == 0 else None, inter_token_latencies_s=[] if i == 0 else [0.01],
                         logprobs=[logprob_of(i)] if logprobs else None)


def logprob_of(i: int) -> TokenLogprobs:
    return TokenLogprobs(-float(i), [i, i + 1], [-float(i), -float(i) - 1])


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("seed", range(6))
def test_taken_responses_reassemble_every_request_and_keep_the_rules(interval, seed):
    rng = random.Random(seed)
    handover = Handover(stream_interval=interval)
    lengths = {f"r{i}": rng.randint(1, 12) for i in range(8)}
    streams = {rid: rng.random() < 0.7 for rid in lengths}
    asked = {rid: rng.random() < 0.5 for rid in lengths}   # logprobs
    for rid in lengths:
        handover.open(rid, streams[rid])
    made = {rid: 0 for rid in lengths}
    got: dict[str, list] = {rid: [] for rid in lengths}
    ttfts, itls = [], []
    while any(r for r in got if not (got[r] and got[r][-1].final)):
        live = [rid for rid in lengths if made[rid] < lengths[rid]]
        step = [token(rid, made[rid], made[rid] + 1 == lengths[rid], asked[rid]) for rid in live
                if rng.random() < 0.8]
        for out in step:
            made[out.request_id] += 1
        handover.merge(step, t=0.0)
        if rng.random() < 0.5 or not live:   # a responder that lags behind some steps
            taken = handover.take(0)
            ttfts += taken.ttfts
            itls += taken.itls
            for ready in taken.ready:
                got[ready.request_id].append(ready)
    for rid, responses in got.items():
        n = lengths[rid]
        assert "".join(r.text for r in responses) == "".join(f"<{rid}:{i}>" for i in range(n))
        assert sum((r.token_ids for r in responses), []) == list(range(n))
        if asked[rid]:   # each response's logprobs are its tokens'
            assert all(r.logprobs == [logprob_of(i) for i in r.token_ids] for r in responses)
        else:
            assert all(r.logprobs is None for r in responses)
        assert [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
        last = responses[-1]
        assert (last.finish_reason, last.completion_tokens, last.prompt_tokens) == ("length", n, 7)
        assert all(r.finish_reason is None for r in responses[:-1])
        if not streams[rid]:
            assert len(responses) == 1
        else:
            assert len(responses[0].token_ids) >= 1 and all(r.token_ids for r in responses[:-1])
            # after the first, a response before the final one carries at least `interval` tokens
            assert all(len(r.token_ids) >= interval for r in responses[1:-1])
    assert sorted(ttfts) == [0.5] * len(lengths) and len(itls) == sum(n - 1 for n in lengths.values())
    assert handover.idle() and not handover._pending   # nothing held for requests that ended


def test_a_responder_that_keeps_up_sends_every_token_on_its_own():
    handover = Handover()
    handover.open("a", stream=True)
    for i in range(5):
        handover.merge([token("a", i, final=i == 4)], t=float(i))
        [ready] = handover.take(0).ready
        assert (ready.token_ids, ready.final, ready.handed) == ([i], i == 4, float(i))


def test_the_first_token_goes_out_at_once_whatever_the_interval():
    handover = Handover(stream_interval=4)
    handover.open("a", stream=True)
    handover.merge([token("a", 0)], t=0.0)
    assert [r.token_ids for r in handover.take(0).ready] == [[0]]
    for i in (1, 2, 3):
        handover.merge([token("a", i)], t=0.0)
        assert handover.take(0).ready == []
    handover.merge([token("a", 4)], t=0.0)
    assert [r.token_ids for r in handover.take(0).ready] == [[1, 2, 3, 4]]
    handover.merge([token("a", 5, final=True)], t=0.0)   # the last tokens go with the final, not held back
    assert [(r.token_ids, r.final) for r in handover.take(0).ready] == [([5], True)]


def test_an_error_sticks_and_the_latest_stats_win():
    handover = Handover()
    handover.open("a", stream=True)
    handover.merge([RequestOutput("a", finished=True, finish_reason="error", error="boom")], t=1.0,
                   stats=EngineStats(num_running=3))
    handover.merge([token("a", 9)], t=2.0, stats=EngineStats(num_running=4))   # a late output changes nothing
    taken = handover.take(0)
    assert [(r.final, r.finish_reason, r.error, r.token_ids) for r in taken.ready] == [(True, "error", "boom", [])]
    assert taken.stats.num_running == 4 and handover.take(0).stats is None


def test_an_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        Handover(stream_interval=0)
