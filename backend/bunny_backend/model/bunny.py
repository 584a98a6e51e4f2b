"""Bunny = SigLIP tower + mlp2x_gelu projector + the unchanged Qwen2 decoder, driven by inputs_embeds.

Image placeholders are expanded before scheduling: each image occupies `num_image_tokens` rows of the token ids,
all equal to IMAGE_TOKEN_INDEX, and `embed_inputs` puts the image features there.

Under tensor parallelism (model/sharding.py) the decoder, embedding and LM head are sharded; the vision tower and
projector live on rank 0 only: they are a small part of the weights (about a fifth of Bunny-v1_0-2B), run once per
image rather than once per token, and rank 0 ships their features to the other ranks once per prefill chunk, so
sharding or replicating them would cost all-reduces per tower layer or memory on every rank for no gain.
"""
from __future__ import annotations

import torch
from torch import nn

from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX
from bunny_backend.model.config import BunnyConfig
from bunny_backend.model.qwen2 import Qwen2Model
from bunny_backend.model.sharding import TextShards
from bunny_backend.model.siglip import SiglipVisionTower
from bunny_backend.utils.distributed import SINGLE, TensorParallel

VISION_PREFIXES = ("model.vision_tower.", "model.mm_projector.")   # checkpoint names of rank 0's part


class VisionTowerWrapper(nn.Module):
    """Bunny's checkpoint nests the tower as `vision_tower.vision_tower.vision_model`."""

    def __init__(self, cfg: BunnyConfig):
        super().__init__()
        self.vision_tower = SiglipVisionTower(cfg.vision)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values)


class BunnyModel(Qwen2Model):
    def __init__(self, cfg: BunnyConfig, shards: TextShards):
        super().__init__(cfg.text, shards)
        if shards.tp.is_driver:
            self.vision_tower = VisionTowerWrapper(cfg)
            self.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, cfg.text.hidden_size), nn.GELU(),
                                              nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size))


class BunnyForCausalLM(nn.Module):
    def __init__(self, cfg: BunnyConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.shards = TextShards.plan(cfg.text, tp)
        self.model = BunnyModel(cfg, self.shards)
        self.lm_head = nn.Linear(cfg.text.hidden_size, self.shards.vocab_rows, bias=False)   # vocabulary-parallel
        self.lm_head.checkpoint_shards = self.shards.vocab("lm_head")
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def has_vision(self) -> bool:
        return self.tp.is_driver

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> SigLIP features [n, T, mm_hidden] (penultimate layer)."""
        return self.model.vision_tower(pixel_values)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> projected image embeddings [n, T, hidden]."""
        return self.model.mm_projector(self.vision_features(pixel_values))

    @staticmethod
    def check_image_rows(input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """The mask of image placeholder rows; ValueError unless there is one feature row for each."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        num_rows = 0 if image_embeds is None else image_embeds.shape[0]
        num_slots = int(is_image.sum())
        if num_slots != num_rows:
            raise ValueError(f"image placeholder rows ({num_slots}) and image feature rows ({num_rows}) differ")
        return is_image

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [N, hidden] with the IMAGE_TOKEN_INDEX rows replaced, in order, by image_embeds [M, hidden]."""
        is_image = self.check_image_rows(input_ids, image_embeds)
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if image_embeds is not None and image_embeds.shape[0]:
            embeds[is_image] = image_embeds.to(embeds.dtype)
        return embeds

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Packed inputs [N, hidden] and positions [N] -> final hidden states [N, hidden], or [M, hidden] for the
        context's output_rows where it names them."""
        return self.model.decode_embeds(inputs_embeds, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [n, vocab] on rank 0 (every rank's vocabulary rows gathered there); None on the other ranks."""
        logits = self.tp.gather_last_dim(self.lm_head(hidden))
        if logits is None or logits.shape[-1] == self.shards.vocab_size:
            return logits
        return logits[..., :self.shards.vocab_size]
