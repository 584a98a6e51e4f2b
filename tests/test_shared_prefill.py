"""Sequences that share a prompt prefix with a running prefill wait for its blocks to enter the prefix cache
instead of computing the same K/V again (the n choices of one request, many users sending the same image)."""
from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.core.sequence import Sequence
from bunny_backend.engine.sampling_params import SamplingParams
from scheduler_helpers import BS, assert_all_free, make_sched, make_seq, step


def computed_tokens(sched, until_decoding):
    """Run steps until every sequence in `until_decoding` has its first token; the prompt tokens each computed."""
    done = {s.request_id: 0 for s in until_decoding}
    while not all(s.num_completion_tokens for s in until_decoding):
        out = step(sched)
        for seq, n in zip(out.seqs[out.num_decodes:], out.num_new_tokens[out.num_decodes:]):
            done[seq.request_id] += n
    return done


def test_the_choices_of_one_prompt_compute_it_once():
    sched = make_sched(max_num_batched_tokens=64)
    choices = [make_seq(f"c{i}", 22) for i in range(4)]
    for s in choices:
        sched.add(s)
    first = step(sched)
    assert first.seqs == [choices[0]] and first.num_new_tokens == [22]
    assert computed_tokens(sched, choices) == {"c0": 0, "c1": 2, "c2": 2, "c3": 2}   # 22 = 5 blocks of 4 + 2
    for s in choices:
        assert s.num_prefix_hit_tokens == (0 if s is choices[0] else 20)
    for s in choices:
        sched.finish(s, "stop")
    assert_all_free(sched)
    assert not sched.block_manager.pending


def test_a_chunked_prefill_is_waited_for_to_its_end():
    sched = make_sched(max_num_batched_tokens=8, max_num_seqs=4)
    a, b = make_seq("a", 30), make_seq("b", 30)
    sched.add(a)
    sched.add(b)
    counts = computed_tokens(sched, [a, b])
    assert counts == {"a": 30, "b": 30 - 28} and b.num_prefix_hit_tokens == 28


def test_others_pass_a_waiting_sequence():
    sched = make_sched()
    a, a2, other = make_seq("a", 12), make_seq("a2", 12), make_seq("other", 12, first=500)
    for s in (a, a2, other):
        sched.add(s)
    out = step(sched)
    assert out.seqs == [a, other]
    out = step(sched)
    assert a2 in out.seqs and a2.num_prefix_hit_tokens == 8


def test_a_cancelled_or_preempted_leader_releases_the_waiters():
    sched = make_sched(max_num_batched_tokens=8, max_num_seqs=4)
    a, b = make_seq("a", 30), make_seq("b", 30)
    sched.add(a)
    sched.add(b)
    step(sched)                      # a's first chunk; b waits
    assert b.status.name == "WAITING"
    sched.abort("a")
    assert not sched.block_manager.pending
    out = step(sched)
    assert out.seqs == [b] and b.num_prefix_hit_tokens == 8    # the one block a sealed is still cached
    sched.finish(b, "stop")
    assert_all_free(sched)


def test_a_short_shared_beginning_is_not_worth_waiting_for():
    sched = make_sched(max_num_batched_tokens=256)
    head = list(range(8))                     # two blocks in common (a system prompt), then 32 tokens of its own
    a = Sequence("a", head + list(range(100, 132)), SamplingParams())
    b = Sequence("b", head + list(range(200, 232)), SamplingParams())
    mostly = Sequence("mostly", head + list(range(100, 124)) + [7] * 8, SamplingParams())   # 32 of 40 in common: it waits
    for s in (a, b, mostly):
        sched.add(s)
    assert step(sched).seqs == [a, b]


def test_nothing_waits_without_prefix_caching():
    sched = make_sched()
    sched.block_manager = BlockManager(64, BS, enable_prefix_caching=False)
    a, b = make_seq("a", 12), make_seq("b", 12)
    sched.add(a)
    sched.add(b)
    assert step(sched).seqs == [a, b]
