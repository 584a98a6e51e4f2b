import hashlib
from types import SimpleNamespace

from bunny_backend.engine.block_manager import BlockManager
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.scheduler import Scheduler
from bunny_backend.engine.sequence import ImageSpan, Sequence, SequenceStatus
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX

BS = 4


def make_sched(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024):
    cfg = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(cfg, BlockManager(num_blocks, BS), max_model_len)


_next_token = iter(range(1000, 10**9))


def make_seq(request_id, n, first=0):
    return Sequence(request_id, list(range(first, first + n)), SamplingParams())


def step(sched):
    """One engine step with a fake runner that samples a fresh token wherever one is due."""
    out = sched.schedule()
    sched.postprocess(out, [next(_next_token) if want else None for want in out.needs_sample])
    return out


def assert_all_free(sched):
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_admits_up_to_max_num_seqs():
    sched = make_sched(max_num_seqs=3)
    seqs = [make_seq(f"r{i}", 5, first=100 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert out.is_prefill and out.seqs == seqs[:3] and out.num_new_tokens == [5, 5, 5]
    assert sched.num_running == 3 and sched.num_waiting == 2
    out = step(sched)
    assert not out.is_prefill and out.seqs == seqs[:3] and out.num_new_tokens == [1, 1, 1]
    sched.finish(seqs[1], "stop")
    out = step(sched)                     # a slot opened: prefill takes priority over decode
    assert out.is_prefill and out.seqs == [seqs[3]]


def test_respects_token_budget_and_chunks():
    sched = make_sched(max_num_batched_tokens=12)
    a, b, c = make_seq("a", 8), make_seq("b", 8, first=50), make_seq("c", 3, first=90)
    for s in (a, b, c):
        sched.add(s)
    out = step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [8, 4] and out.needs_sample == [True, False]
    assert a.num_tokens == 9 and b.num_tokens == 8 and b.num_cached_tokens == 4
    # b keeps its blocks and continues before c is admitted; decode of a waits for the prefills.
    out = step(sched)
    assert out.is_prefill and out.seqs == [b, c] and out.num_new_tokens == [4, 3]
    assert sum(out.num_new_tokens) <= 12
    out = step(sched)
    assert not out.is_prefill and out.seqs == [a, b, c]


def test_long_prompt_is_chunked_across_steps():
    sched = make_sched(max_num_batched_tokens=10)
    seq = make_seq("long", 25)
    sched.add(seq)
    chunks = []
    while not seq.is_prefill_done:
        out = step(sched)
        assert out.is_prefill and out.seqs == [seq]
        chunks.append((out.num_new_tokens[0], out.needs_sample[0]))
    assert chunks == [(10, False), (10, False), (5, True)]
    assert len(seq.block_table) == 7 and seq.num_completion_tokens == 1
    out = step(sched)
    assert not out.is_prefill and out.num_new_tokens == [1]
    sched.finish(seq, "length")
    assert_all_free(sched)


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
    assert out.seqs == [a] and sched.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_tokens == 9
    c = make_seq("c", 3, first=90)
    sched.add(c)
    assert list(sched.waiting) == [b, c]
    generated_b = b.completion_token_ids
    sched.finish(a, "stop")
    out = step(sched)
    assert out.is_prefill and out.seqs == [b, c]
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


def test_prompt_ending_in_an_image_row_never_decodes_it():
    sched = make_sched(max_num_batched_tokens=5)
    img = ImageSpan(2, 4, hashlib.sha256(b"x").digest(), pixel_values=None)
    seq = Sequence("img", [1, 2] + [IMAGE_TOKEN_INDEX] * 4, SamplingParams(), images=[img])
    sched.add(seq)
    out = step(sched)
    assert out.num_new_tokens == [5] and seq.num_cached_tokens == seq.num_tokens - 1
    assert not seq.is_prefill_done
    out = step(sched)
    assert out.is_prefill and out.num_new_tokens == [1] and out.needs_sample == [True]
    assert seq.is_prefill_done
