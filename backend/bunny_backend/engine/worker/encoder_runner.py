"""The vision phase of a step, before the LLM forward: every image the step's prefill chunks reach gets its
features, from the encoder cache or from one batched vision-tower call over the rest (each distinct image once).

Features stay on their ImageSpan for the sequence's life (chunked prefill, preemption and quarantine reuse them),
so an image is encoded at most once per request, and at most once while the cache keeps it.
"""
from __future__ import annotations

import time

import torch

from bunny_backend.engine.worker.device import synchronize
from bunny_backend.engine.worker.encoder_cache import EncoderCache
from bunny_backend.engine.core.sequence import ImageSpan


class EncoderRunner:
    def __init__(self, model, cache: EncoderCache, device: torch.device):
        """model: anything with encode_images(pixels [n, 3, S, S]) -> [n, T, hidden] (BunnyForCausalLM)."""
        self.model, self.cache, self.device = model, cache, device
        self.images_encoded = 0
        self.seconds = 0.0   # wall time of the vision-tower calls

    @torch.inference_mode()
    def run(self, images: list[ImageSpan]) -> None:
        todo: dict[bytes, list[ImageSpan]] = {}
        for img in images:
            if img.embeds is not None:
                continue
            if img.content_hash in todo:
                todo[img.content_hash].append(img)
                continue
            feats = self.cache.get(img.content_hash)
            if feats is None:
                if img.pixel_values is None:
                    raise RuntimeError("an image has neither features nor pixels to encode")
                todo[img.content_hash] = [img]
            else:
                img.embeds, img.pixel_values = feats, None
        if not todo:
            return
        t0 = time.perf_counter()
        pixels = torch.stack([spans[0].pixel_values for spans in todo.values()]).to(self.device)
        batch = self.model.encode_images(pixels)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.images_encoded += len(todo)
        for (content_hash, spans), feats in zip(todo.items(), batch.unbind(0)):
            feats = feats.clone() if len(todo) > 1 else feats   # a view would keep the whole batch alive
            self.cache.put(content_hash, feats)
            for img in spans:
                img.embeds, img.pixel_values = feats, None
