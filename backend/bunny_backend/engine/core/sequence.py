"""One request as the scheduler sees it: a growing list of token ids, its KV-cache blocks and its prefill progress.

Images are expanded before scheduling: an image of T feature rows occupies T positions of `token_ids`, each
IMAGE_TOKEN_INDEX, and an `ImageSpan` says where and what it is. Nothing here knows about paging beyond `block_table`.

Progress: the first `num_cached_tokens` tokens have their K/V in the cache. Each step computes
token_ids[num_cached_tokens : num_cached_tokens + n] for the n the scheduler chose; when that reaches the end of
token_ids, the last row's logits are sampled and the new token appended (its own K/V is computed by the next step).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum, auto

import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX

_seq_counter = itertools.count()


@dataclass
class ImageSpan:
    offset: int                         # position of the first feature row in token_ids
    length: int                         # number of feature rows
    content_hash: bytes                 # sha256 of the encoded image bytes
    pixel_values: torch.Tensor | None
    embeds: torch.Tensor | None = None  # [length, hidden], filled by the model runner, kept across preemption


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, token_ids: list[int], params: SamplingParams,
                 images: list[ImageSpan] = (), arrival_time: float | None = None):
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.images = sorted(images, key=lambda im: im.offset)
        for im in self.images:
            span = self.token_ids[im.offset:im.offset + im.length]
            if im.offset < 0 or im.length < 1 or len(span) != im.length or any(t != IMAGE_TOKEN_INDEX for t in span):
                raise ValueError(f"image span at {im.offset} (+{im.length}) does not cover IMAGE_TOKEN_INDEX tokens")
        self.params = params
        self.grammar = None               # structured_output.SequenceGrammar of a response_format; None: free text
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None

        # Grows at its end only; BlockManager.free replaces the list (engine/worker/block_tables.py relies on both).
        self.block_table: list[int] = []
        self.num_cached_tokens = 0        # prefill progress; see the module docstring
        self.num_prefix_hit_tokens = 0    # of those, taken from the prefix cache at the last allocation
        self.num_sealed_blocks = 0        # leading blocks whose hash the block manager has computed
        self.prefill_chunk = 0            # prompt tokens per step beside running decodes; 0: not fixed yet (Scheduler)

        # Failure isolation (Scheduler.quarantine): after a failed batch, a suspect runs alone until it has done
        # its recompute prefill and one decode step; quarantined counts how often that happened.
        self.suspect = False
        self.num_quarantines = 0

        # Sampling randomness: the request's seed, or for a request without one the seed the engine draws for it
        # (set_seed). The effective seed is kept so a runner can seed a generator on its own device.
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.set_seed(params.seed)

        # Set by the engine (time.monotonic() or whatever clock it uses consistently).
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.name}, "
                f"tokens={self.num_tokens}, cached={self.num_cached_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefill_done(self) -> bool:
        """True when the next step is a decode step: everything but the last token is cached.

        A last token that is an image row stays a (one-token) prefill, because decode embeds token ids only.
        That can happen only before the first sampled token.
        """
        return self.num_cached_tokens == len(self.token_ids) - 1 and self.token_ids[-1] != IMAGE_TOKEN_INDEX

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the K/V of every current token."""
        return (len(self.token_ids) + block_size - 1) // block_size

    def set_seed(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_hash_extra(self, start: int, end: int) -> tuple[bytes, ...]:
        """Identity of the image rows inside token range [start, end), for the prefix-cache block hash.

        Each entry is the image's content hash followed by its offset relative to `start` (8 bytes, signed):
        identical pad tokens stand for different rows when images of the same content sit at different offsets.
        """
        return tuple(im.content_hash + (im.offset - start).to_bytes(8, "little", signed=True)
                     for im in self.images if im.offset < end and im.offset + im.length > start)
