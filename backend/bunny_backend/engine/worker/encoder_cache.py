"""Image features by the image's content hash, so a repeated image skips the vision tower: bounded in bytes, LRU.

The features of an image are its projected embeddings [num_image_tokens, hidden] on the model's device. The cache
holds its own reference to each entry; a sequence that took an entry keeps it (ImageSpan.embeds) even after the
cache evicts it, so eviction never breaks a request in flight. Its capacity is part of the memory plan
(kv_cache.py). Used from the engine thread only.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EncoderCache:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"encoder cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()   # least recently used first
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, content_hash: bytes) -> bool:
        """A peek: counts nothing and leaves the LRU order alone (the scheduler's budget check)."""
        return content_hash in self._entries

    def get(self, content_hash: bytes) -> torch.Tensor | None:
        feats = self._entries.get(content_hash)
        if feats is None:
            self.misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self.hits += 1
        return feats

    def put(self, content_hash: bytes, feats: torch.Tensor) -> None:
        """Keep `feats` (it must not be modified afterwards), evicting the least recently used entries to make
        room; features larger than the whole cache are not kept."""
        size = tensor_bytes(feats)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(content_hash, None)
        if old is not None:
            self.num_bytes -= tensor_bytes(old)
        while self.num_bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= tensor_bytes(evicted)
            self.evictions += 1
        self._entries[content_hash] = feats
        self.num_bytes += size
