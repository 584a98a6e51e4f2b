import hashlib

import pytest

from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.core.sequence import ImageSpan, Sequence
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX

BS = 4


def make_seq(tokens, images=()):
    return Sequence("r", list(tokens), SamplingParams(), images=images)


def image(offset, length, data=b"img"):
    return ImageSpan(offset, length, hashlib.sha256(data).digest(), pixel_values=None)


def prefill(bm, seq):
    """What a full prefill does to the cache: compute every token, register the full blocks, sample one token."""
    seq.num_cached_tokens = seq.num_tokens
    bm.seal_full_blocks(seq)
    seq.append_token(7)


def test_allocate_and_free_refcounts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == 3 == bm.num_used_blocks
    assert seq.num_cached_tokens == seq.num_prefix_hit_tokens == 0
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_can_allocate_refuses_when_short_of_blocks():
    bm = BlockManager(num_blocks=2, block_size=BS)
    assert not bm.can_allocate(make_seq(range(9)))
    assert bm.can_allocate(make_seq(range(8)))
    assert bm.blocks_needed(9) == 3 and bm.blocks_needed(0) == 0
    assert not BlockManager(num_blocks=0, block_size=BS).can_allocate(make_seq([1]))


def test_shared_prefix_hits_and_refcounts():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(10)))
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq(list(range(8)) + [50, 51, 52])
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2, 1]
    assert bm.prefix_hit_tokens_total == 8 and bm.prefix_query_tokens_total == 10 + 11
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_divergence_stops_the_chain():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(13))
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11, 12])   # block 1 differs, block 2 equal but chained
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == 4


def test_no_hit_when_image_differs_at_same_positions():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = [1, 2] + [IMAGE_TOKEN_INDEX] * 6 + [3, 4, 5]
    a = make_seq(tokens, [image(2, 6, b"cat")])
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq(tokens, [image(2, 6, b"dog")])
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == 0
    c = make_seq(tokens, [image(2, 6, b"cat")])
    bm.allocate(c)
    assert c.num_prefix_hit_tokens == 8


def test_no_hit_when_same_image_at_other_offset():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([IMAGE_TOKEN_INDEX] * 5 + [IMAGE_TOKEN_INDEX] * 3 + [1, 2], [image(0, 5, b"x"), image(5, 3, b"x")])
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq([IMAGE_TOKEN_INDEX] * 3 + [IMAGE_TOKEN_INDEX] * 5 + [1, 2], [image(0, 3, b"x"), image(3, 5, b"x")])
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == 0


def test_hit_never_covers_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(8))
    bm.allocate(a)
    prefill(bm, a)            # a now has 9 tokens: both prompt blocks are full and registered
    b = make_seq(range(8))    # identical 8-token prompt: block 1 holds its last token
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and len(b.block_table) == 2
    assert b.block_table[1] != a.block_table[1]


def test_only_sealed_blocks_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(range(12))
    bm.allocate(a)
    a.num_cached_tokens = 5             # first chunk computed: only block 0 complete
    bm.seal_full_blocks(a)
    b = make_seq(range(12))
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == 4


def test_hashes_survive_free_and_are_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(range(9))
    bm.allocate(a)
    prefill(bm, a)
    first_blocks = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_seq(range(9))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == first_blocks and b.num_prefix_hit_tokens == 8
    assert bm.num_free_blocks == 1
    bm.free(b)
    e = make_seq(range(200, 203))        # one block: takes the unhashed one, the cached prefix survives
    bm.allocate(e)
    assert bm.can_allocate(b) and bm._match_prefix(b) == first_blocks
    bm.free(e)
    # Unrelated content takes the unhashed block first, then the LRU hashed ones; their hashes are dropped.
    c = make_seq(range(100, 116))
    bm.allocate(c)
    prefill(bm, c)
    bm.free(c)
    d = make_seq(range(9))
    bm.allocate(d)
    assert d.num_prefix_hit_tokens == 0
    bm.free(d)
    assert bm.num_free_blocks == 4 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_can_allocate_counts_hits_on_blocks_in_use():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(range(9))
    bm.allocate(a)
    prefill(bm, a)
    assert bm.num_free_blocks == 0
    b = make_seq(list(range(8)) + [42])
    assert not bm.can_allocate(b)        # 2 blocks shared, the third needs a free one
    bm.free(a)
    assert bm.can_allocate(b)


def test_decode_growth_and_sealing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(range(3))
    bm.allocate(seq)
    prefill(bm, seq)                     # 4 tokens, 3 cached: the 4th goes into block 0
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 1
    seq.num_cached_tokens += 1
    bm.seal_full_blocks(seq)
    assert bm.blocks[seq.block_table[0]].hash is not None
    seq.append_token(8)                  # 5th token starts block 1
    bm.may_append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    bm.free(seq)
    assert bm.num_free_blocks == 4


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    bm.allocate(a)
    prefill(bm, a)
    b = make_seq(range(9))
    bm.allocate(b)
    assert b.num_prefix_hit_tokens == 0 and not bm.hash_to_block


def test_allocate_twice_is_a_bug():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(range(3))
    bm.allocate(seq)
    with pytest.raises(AssertionError):
        bm.allocate(seq)
