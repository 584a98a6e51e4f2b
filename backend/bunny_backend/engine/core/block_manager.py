"""Paged KV-cache bookkeeping: which cache block holds which tokens of which sequence, with prefix caching.

Prefix caching: once a full block's K/V has been computed (`seal_full_blocks`), its hash is registered. The hash is
chained, blake2b(previous block's hash, the block's token ids, the identity of the image rows in it), so a hit on
block i implies the whole prefix up to it matches; a hit is also verified against the stored token ids and images.
A freed block keeps its hash and stays findable until the free list hands it out for other content. The free
list is ordered: blocks with no hash go to the front and are reused first, hashed ones go to the back (LRU).

Hashes are registered only after the K/V is written, never at allocation, so a sequence can never hit a block
that is still waiting for its prefill chunk. The hashes of the full blocks a sequence is still to compute are
kept as pending instead (`in_flight_prefix`): a newcomer most of whose prompt is pending (the n choices of one
prompt, many users sending the same image) can wait for it rather than compute the same K/V again.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from bunny_backend.engine.core.sequence import Sequence

_ROOT_HASH = bytes(16)


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids", "extra")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()
        self.extra: tuple[bytes, ...] = ()

    def reset(self) -> None:
        self.ref_count = 1
        self.hash = None
        self.token_ids = ()
        self.extra = ()


def block_hash(prev_hash: bytes, token_ids: list[int] | tuple[int, ...], extra: tuple[bytes, ...]) -> bytes:
    h = hashlib.blake2b(prev_hash, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    for e in extra:
        h.update(len(e).to_bytes(4, "little"))
        h.update(e)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"bad KV cache shape: {num_blocks} blocks of {block_size} tokens")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_hit_tokens_total = 0
        self.prefix_query_tokens_total = 0
        self.pending: dict[bytes, int] = {}                  # hash of a full block being computed -> sequences
        self._pending_of: dict[int, list[bytes]] = {}        # seq_id -> its pending hashes, in block order

    # -- stats ---------------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- allocation ----------------------------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full: int):
        """(hash, token ids, extra) of seq's first num_full full blocks, chained."""
        bs, h = self.block_size, _ROOT_HASH
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            extra = seq.block_hash_extra(i * bs, (i + 1) * bs)
            h = block_hash(h, tokens, extra)
            yield h, tokens, extra

    def _cached(self, h: bytes, tokens: tuple[int, ...], extra: tuple[bytes, ...]) -> int | None:
        """The block holding this content, verified, or None."""
        block_id = self.hash_to_block.get(h)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block_id if block.hash == h and block.token_ids == tokens and block.extra == extra else None

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the leading full blocks of seq, stopping at the first miss.

        Only blocks entirely before the last token may hit: at least one token must be computed to get logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h, tokens, extra in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block_id = self._cached(h, tokens, extra)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def in_flight_prefix(self, seq: Sequence) -> bool:
        """Whether most of what seq would compute is being computed by a running prefill: the blocks after its
        cache hits are pending and cover at least half of its uncached tokens (a prompt that shares only a short
        system prompt with one being computed does not wait for it)."""
        if not self.pending:
            return False
        hits = pending = 0
        for h, tokens, extra in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            if not pending and self._cached(h, tokens, extra) is not None:
                hits += 1
            elif h in self.pending:
                pending += 1
            else:
                break
        return pending > 0 and 2 * pending * self.block_size >= seq.num_tokens - hits * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._match_prefix(seq)
        # A hit on a free block takes it off the free list just like a fresh block does.
        hits_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return seq.num_blocks(self.block_size) - hits_in_use <= len(self.free_block_ids)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every current token of seq; sets num_cached_tokens = num_prefix_hit_tokens = cache hits."""
        assert not seq.block_table, f"{seq} already has blocks"
        hits = self._match_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks(self.block_size) - len(hits)):
            seq.block_table.append(self._take_free_block())
        hit_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_prefix_hit_tokens = hit_tokens
        seq.num_sealed_blocks = len(hits)
        self.prefix_hit_tokens_total += hit_tokens
        self.prefix_query_tokens_total += seq.num_tokens
        if self.enable_prefix_caching:
            pending = [h for h, _, _ in self._hashes(seq, seq.num_tokens // self.block_size)][len(hits):]
            for h in pending:
                self.pending[h] = self.pending.get(h, 0) + 1
            self._pending_of[seq.seq_id] = pending

    def _drop_pending(self, seq: Sequence, count: int | None = None) -> None:
        """Take seq's first `count` pending hashes (all when None) off the pending set."""
        mine = self._pending_of.get(seq.seq_id)
        if not mine:
            return
        done = mine if count is None else mine[:count]
        for h in done:
            left = self.pending[h] - 1
            if left:
                self.pending[h] = left
            else:
                del self.pending[h]
        if count is None or count >= len(mine):
            del self._pending_of[seq.seq_id]
        else:
            del mine[:count]

    def _take_free_block(self) -> int:
        if not self.free_block_ids:
            raise RuntimeError("KV cache is out of blocks (the scheduler should have checked)")
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.reset()
        return block_id

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (tail first, so the tail is evicted before the shared head)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []   # a new list: runners keep rows keyed on the old one (engine/worker/block_tables.py)
        seq.num_cached_tokens = 0
        seq.num_sealed_blocks = 0
        self._drop_pending(seq)

    # -- decode growth -------------------------------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        return seq.num_blocks(self.block_size) - len(seq.block_table) <= len(self.free_block_ids)

    def may_append(self, seq: Sequence) -> None:
        """Before a step that computes seq's last token: make sure a block holds its slot."""
        while len(seq.block_table) < seq.num_blocks(self.block_size):
            seq.block_table.append(self._take_free_block())

    # -- prefix-cache registration -------------------------------------------------------------------------------

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Register the hash of every full block of seq whose K/V is now computed (all of it < num_cached_tokens).

        Call after each step for each scheduled sequence, once num_cached_tokens has been advanced.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_cached_tokens // bs, len(seq.block_table))
        for i in range(seq.num_sealed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].hash if i else _ROOT_HASH
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            extra = seq.block_hash_extra(i * bs, (i + 1) * bs)
            block.hash = block_hash(prev, tokens, extra)
            block.token_ids, block.extra = tokens, extra
            # An identical block computed concurrently by another sequence may already be registered: keep it.
            owner = self.hash_to_block.get(block.hash)
            if owner is None or self.blocks[owner].hash != block.hash:
                self.hash_to_block[block.hash] = block.block_id
        self._drop_pending(seq, max(0, num_full - seq.num_sealed_blocks))
        seq.num_sealed_blocks = max(seq.num_sealed_blocks, num_full)
