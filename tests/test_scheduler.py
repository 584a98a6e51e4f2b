"""The scheduler: admission within max_num_seqs and the token budget, prompt chunks beside decodes, preemption
and readmission, aborts, and the config rules on budgets (image rows: test_scheduler_images.py)."""
import pytest

from bunny_backend.config import EngineConfig
from bunny_backend.engine.core.sequence import SequenceStatus
from bunny_backend.engine.worker.device import DevicePlan
from scheduler_helpers import assert_all_free, make_sched, make_seq, step


def test_admits_up_to_max_num_seqs():
    sched = make_sched(max_num_seqs=3)
    seqs = [make_seq(f"r{i}", 5, first=100 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert out.num_decodes == 0 and out.seqs == seqs[:3] and out.num_new_tokens == [5, 5, 5]
    assert sched.num_running == 3 and sched.num_waiting == 2
    out = step(sched)
    assert out.num_decodes == 3 and out.seqs == seqs[:3] and out.num_new_tokens == [1, 1, 1]
    sched.finish(seqs[1], "stop")
    out = step(sched)                     # a slot opened: the running decode, the newcomer prefills beside them
    assert out.seqs == [seqs[0], seqs[2], seqs[3]] and out.num_decodes == 2 and out.num_new_tokens == [1, 1, 5]
    assert out.needs_sample == [True, True, True]


def test_respects_token_budget_and_chunks():
    sched = make_sched(max_num_batched_tokens=12)
    a, b, c = make_seq("a", 8), make_seq("b", 8, first=50), make_seq("c", 3, first=90)
    for s in (a, b, c):
        sched.add(s)
    out = step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [8, 4] and out.needs_sample == [True, False]
    assert a.num_tokens == 9 and b.num_tokens == 8 and b.num_cached_tokens == 4
    # a decodes; b continues before c is admitted; all in one step within the budget
    out = step(sched)
    assert out.seqs == [a, b, c] and out.num_decodes == 1 and out.num_new_tokens == [1, 4, 3]
    assert sum(out.num_new_tokens) <= 12
    out = step(sched)
    assert out.seqs == [a, b, c] and out.num_decodes == 3


def test_decodes_take_the_budget_first():
    sched = make_sched(max_num_batched_tokens=6)
    decoders = [make_seq(f"d{i}", 2, first=10 * i) for i in range(3)]
    for s in decoders:
        sched.add(s)
    step(sched)
    sched.add(long := make_seq("long", 10, first=500))
    out = step(sched)
    assert out.seqs == decoders + [long] and out.num_decodes == 3 and out.num_new_tokens == [1, 1, 1, 3]


def test_long_prompt_is_chunked_across_steps():
    sched = make_sched(max_num_batched_tokens=10)
    seq = make_seq("long", 25)
    sched.add(seq)
    chunks = []
    while not seq.is_prefill_done:
        out = step(sched)
        assert out.num_decodes == 0 and out.seqs == [seq]
        chunks.append((out.num_new_tokens[0], out.needs_sample[0]))
    assert chunks == [(10, False), (10, False), (5, True)]
    assert len(seq.block_table) == 7 and seq.num_completion_tokens == 1
    out = step(sched)
    assert out.num_decodes == 1 and out.num_new_tokens == [1]
    sched.finish(seq, "length")
    assert_all_free(sched)


def test_prefill_is_bounded_only_while_streams_decode():
    sched = make_sched(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=9)   # > 4 a decode
    alone = make_seq("alone", 20, first=300)
    sched.add(alone)
    assert step(sched).num_new_tokens == [20]     # nobody decodes: the whole prompt at once
    sched.finish(alone, "stop")
    a, b = make_seq("a", 3), make_seq("b", 3, first=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.add(long := make_seq("long", 20, first=100))
    sched.add(short := make_seq("short", 3, first=200))
    shapes = []
    while not long.is_prefill_done:
        out = step(sched)
        shapes.append((out.num_decodes, [s.request_id for s in out.seqs[out.num_decodes:]],
                       sum(out.num_new_tokens[out.num_decodes:])))
        assert out.seqs[:2] == [a, b]   # the running streams get a token every step
    assert shapes == [(2, ["long"], 9), (2, ["long"], 9), (2, ["long", "short"], 5)]
    assert short.num_cached_tokens == 3


def test_the_prefill_bound_grows_with_the_decodes_in_the_step():
    """Beside many decodes a step may carry PREFILL_TOKENS_PER_DECODE prompt tokens per decode, more than the
    configured bound; beside few, the bound holds."""
    for streams, want in ((40, 160), (3, 16)):   # 4 tokens a decode, or the bound of 16
        sched = make_sched(num_blocks=512, max_num_seqs=64, max_num_batched_tokens=512,
                           max_prefill_tokens_while_decoding=16)
        running = [make_seq(f"s{i}", 3, first=10 * i) for i in range(streams)]
        for seq in running:
            sched.add(seq)
        step(sched)   # admitted together: nobody was streaming yet
        sched.add(newcomer := make_seq("new", 300, first=5000))
        out = step(sched)
        assert out.num_decodes == streams and out.seqs[streams:] == [newcomer]
        assert out.num_new_tokens[streams:] == [want]


def prefill_chunks(sched, seq):
    """The chunk sizes seq's prefill runs in, stepping the scheduler until it is done."""
    sizes = []
    while not seq.is_prefill_done:
        out = step(sched)
        sizes += [n for s, n in zip(out.seqs, out.num_new_tokens) if s is seq]
    return sizes


def test_a_prompt_beside_decodes_is_spread_over_the_configured_steps():
    sched = make_sched(num_blocks=400, max_num_batched_tokens=1024, max_model_len=2048,
                       max_prefill_tokens_while_decoding=128, prefill_chunks_while_decoding=4)
    sched.add(alone := make_seq("alone", 200, first=5000))
    assert prefill_chunks(sched, alone) == [200]           # nobody decodes: one step
    sched.add(stream := make_seq("stream", 3))
    step(sched)
    assert stream.is_prefill_done
    for n, want in ((200, [50] * 4),                        # a quarter each step
                    (100, [32, 32, 32, 4]),                 # but never below MIN_CHUNK_BESIDE_DECODES
                    (600, [128] * 4 + [88]),                # nor above max_prefill_tokens_while_decoding
                    (20, [20])):
        sched.add(seq := make_seq(f"p{n}", n, first=1000 * n))
        assert prefill_chunks(sched, seq) == want
        assert stream.status == SequenceStatus.RUNNING     # decoded beside it all along
        sched.finish(seq, "stop")


def test_a_burst_that_came_before_any_stream_started_is_not_spread():
    """The first request of a burst starts alone; the rest arrived before its first token, so nobody was
    streaming when they came: they go in whole (the step's budget allowing), the later arrival is spread."""
    sched = make_sched(num_blocks=400, max_num_batched_tokens=1024, max_model_len=2048,
                       max_prefill_tokens_while_decoding=128, prefill_chunks_while_decoding=4)
    first = make_seq("first", 3)
    first.arrival_time = 0.0
    sched.add(first)
    step(sched)
    first.first_token_time = 1.0                      # as the engine stamps it
    burst = [make_seq(f"b{i}", 200, first=1000 * (i + 1)) for i in range(3)]
    late = make_seq("late", 200, first=9000)
    for i, seq in enumerate(burst):
        seq.arrival_time = 0.1 + i / 100              # sent with the first, queued behind its prefill
        sched.add(seq)
    late.arrival_time = 1.5                           # after the first's stream began
    sched.add(late)
    out = step(sched)
    assert out.num_decodes == 1 and out.seqs[0] is first
    assert dict(zip((s.request_id for s in out.seqs[1:]), out.num_new_tokens[1:])) == {
        "b0": 200, "b1": 200, "b2": 200, "late": 50}
    sched.add(unknown := make_seq("unknown", 200, first=20000))   # no arrival time: spread, as before
    assert prefill_chunks(sched, unknown)[0] == 50


def test_a_preempted_prompt_spreads_its_recompute_afresh():
    sched = make_sched(num_blocks=400, max_num_batched_tokens=1024, max_model_len=2048,
                       max_prefill_tokens_while_decoding=128, prefill_chunks_while_decoding=4)
    sched.add(stream := make_seq("stream", 3))
    step(sched)
    sched.add(seq := make_seq("seq", 200, first=100))
    step(sched)
    assert seq.num_cached_tokens == 50 and seq.prefill_chunk == 50
    sched._preempt(seq)
    assert seq.prefill_chunk == 0
    # readmitted, its 12 sealed blocks (48 tokens) come from the prefix cache: the other 152 go in 4 chunks
    assert prefill_chunks(sched, seq) == [38] * 4


def test_preempts_latest_and_readmits_it_first():
    sched = make_sched(num_blocks=4)
    a, b = make_seq("a", 4), make_seq("b", 4, first=50)
    sched.add(a)
    sched.add(b)
    step(sched)                           # prefill: 1 block each
    for _ in range(4):                    # decode to 8 cached tokens: 2 blocks each, cache full
        step(sched)
    assert sched.block_manager.num_free_blocks == 0 and a.num_tokens == b.num_tokens == 9
    out = step(sched)                     # both need a third block: b, the latest, is preempted
    assert out.seqs == [a] and out.num_decodes == 1 and sched.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_tokens == 9
    c = make_seq("c", 3, first=90)
    sched.add(c)
    assert list(sched.waiting) == [b, c]
    generated_b = b.completion_token_ids
    sched.finish(a, "stop")
    out = step(sched)
    assert out.num_decodes == 0 and out.seqs == [b, c]
    # b's first block is still cached (its tail block, evicted first, went to a): the recompute skips it.
    assert b.num_prefix_hit_tokens == 4 and out.num_new_tokens == [5, 3]
    assert b.completion_token_ids[:len(generated_b)] == generated_b and b.num_completion_tokens == 6
    for s in (b, c):
        sched.finish(s, "stop")
    assert_all_free(sched)


def test_lone_sequence_preempts_itself():
    sched = make_sched(num_blocks=2)
    a = make_seq("a", 4)
    sched.add(a)
    for _ in range(5):
        step(sched)
    assert a.num_cached_tokens == 8 and a.num_tokens == 9
    out = step(sched)
    assert out.is_empty and sched.num_preemptions == 1 and list(sched.waiting) == [a]
    assert_all_free(sched)


def test_abort_while_waiting_prefilling_and_decoding():
    sched = make_sched(max_num_seqs=2, max_num_batched_tokens=10)
    waiting, prefilling, decoding = make_seq("w", 5, 100), make_seq("p", 30, 200), make_seq("d", 5, 300)
    for s in (decoding, prefilling, waiting):
        sched.add(s)
    step(sched)
    assert decoding.num_completion_tokens == 1 and prefilling.num_cached_tokens == 5
    assert list(sched.waiting) == [waiting]
    for s in (waiting, prefilling, decoding):
        assert sched.abort(s.request_id) is s
        assert s.status == SequenceStatus.FINISHED and s.finish_reason == "cancelled" and s.block_table == []
    assert sched.abort("unknown") is None and sched.abort("d") is None
    assert not sched.has_unfinished()
    assert_all_free(sched)


def test_abort_during_a_step_is_skipped_by_postprocess():
    sched = make_sched()
    seq = make_seq("a", 6)
    sched.add(seq)
    out = sched.schedule()
    sched.abort("a")
    sched.postprocess(out, [1])
    assert seq.num_tokens == 6 and seq.num_cached_tokens == 0
    assert_all_free(sched)


def test_check_fits():
    sched = make_sched(num_blocks=8, max_model_len=100)
    assert sched.check_fits(10, 20) is None
    assert "empty" in sched.check_fits(0, 20)
    msg = sched.check_fits(90, 20)
    assert "90 tokens" in msg and "max_tokens (20)" in msg and "context of 100" in msg
    assert sched.check_fits(20, 13) is None             # 32 tokens of K/V fit 8 blocks of 4
    msg = sched.check_fits(20, 14)
    assert "needs 9 KV-cache blocks" in msg and "holds 8" in msg
    assert "holds 0" in make_sched(num_blocks=0).check_fits(1, 1)


def test_mixed_step_preempts_the_latest_admitted_even_mid_prefill():
    sched = make_sched(num_blocks=4, max_num_batched_tokens=4)
    a, b, c = make_seq("a", 2), make_seq("b", 2, first=50), make_seq("c", 8, first=90)
    sched.add(a)
    sched.add(b)
    step(sched)                       # a and b prefill: one block each
    sched.add(c)
    for _ in range(2):                # a and b decode in their first block; c prefills 2 tokens a step beside them
        out = step(sched)
        assert out.seqs == [a, b, c] and out.num_decodes == 2 and out.num_new_tokens == [1, 1, 2]
    assert sched.block_manager.num_free_blocks == 0 and c.num_cached_tokens == 4
    sched.add(d := make_seq("d", 2, first=300))
    out = step(sched)                 # a and b need a second block: c, admitted last, gives its blocks back
    assert out.seqs == [a, b] and out.num_decodes == 2 and sched.num_preemptions == 1
    assert c.status == SequenceStatus.WAITING and c.block_table == [] and list(sched.waiting) == [c, d]
    out = step(sched)                 # no room yet for c, and d does not jump the queue
    assert out.seqs == [a, b]


def test_config_refuses_budgets_that_would_starve_a_stream():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        EngineConfig(max_num_batched_tokens=8, max_num_seqs=16)
    with pytest.raises(ValueError, match="max_images_per_encoder_batch must be >= 1"):
        EngineConfig(max_images_per_encoder_batch=0)
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding must be >= 0"):
        EngineConfig(max_prefill_tokens_while_decoding=-1)
    with pytest.raises(ValueError, match="prefill_chunks_while_decoding must be >= 0"):
        EngineConfig(prefill_chunks_while_decoding=-1)


def test_the_prefill_bound_is_the_devices_unless_set():
    assert DevicePlan.resolve(EngineConfig(device="cpu")).max_prefill_tokens_while_decoding == 128
    assert DevicePlan.resolve(EngineConfig(device="cpu", max_prefill_tokens_while_decoding=300)) \
        .max_prefill_tokens_while_decoding == 300
    assert DevicePlan.resolve(EngineConfig(device="cpu")).prefill_chunks_while_decoding == 8
    assert DevicePlan.resolve(EngineConfig(device="cpu", prefill_chunks_while_decoding=1)) \
        .prefill_chunks_while_decoding == 1
