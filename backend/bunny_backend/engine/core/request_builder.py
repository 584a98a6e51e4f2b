"""A request's raw inputs (a text or a conversation, encoded images, sampling parameters) -> a validated `Sequence`,
or a BadRequestError that names the problem: the configured limits, unreadable images, image placeholders that do
not match the images, prompts that can never fit."""
from __future__ import annotations

import dataclasses
import hashlib
import time

from bunny_backend.config import EngineConfig
from bunny_backend.engine.outputs import BadRequestError
from bunny_backend.engine.sampling_params import SamplingParams, min_tokens_problem
from bunny_backend.engine.core.sequence import ImageSpan, Sequence
from bunny_backend.io.conversation import Message, build_prompt
from bunny_backend.io.image import ImageError, decode_image, preprocess_image
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, tokenize_prompt

Prompt = str | list[Message]   # one user message (the whole prompt without the template), or a conversation


class RequestBuilder:
    def __init__(self, config: EngineConfig, tokenizer, image_size: int, num_image_tokens: int,
                 max_model_len: int, check_fits, room):
        """check_fits(num_prompt_tokens, max_tokens) -> why the request can never run, or None; room(num_prompt_tokens)
        -> the most new tokens that fit after it (both the scheduler's)."""
        self.config = config
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        # 0 or beyond the context: the scheduler's check_fits names the context length instead
        self.max_prompt_tokens = config.max_prompt_tokens if 0 < config.max_prompt_tokens < max_model_len else 0
        self.check_fits = check_fits
        self.room = room

    def build(self, request_id: str, prompt: Prompt, images: list[bytes], params: SamplingParams,
              apply_chat_template: bool) -> Sequence:
        self._check_raw(prompt, images, params)
        try:
            text = build_prompt(prompt, len(images), apply_chat_template)
            ids = tokenize_prompt(self.tokenizer, text, num_images=len(images))
            pixels = [preprocess_image(decode_image(data, self.config.max_image_pixels), self.image_size,
                                       self.config.max_image_pixels) for data in images]
        except ImageError as e:
            raise BadRequestError(f"image: {e}") from None
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        token_ids, spans = [], []
        image_iter = iter(zip(images, pixels))
        for tid in ids:
            if tid == IMAGE_TOKEN_INDEX:
                data, px = next(image_iter)
                spans.append(ImageSpan(offset=len(token_ids), length=self.num_image_tokens,
                                       content_hash=hashlib.sha256(data).digest(), pixel_values=px))
                token_ids += [IMAGE_TOKEN_INDEX] * self.num_image_tokens
            else:
                token_ids.append(tid)
        if not token_ids:
            raise BadRequestError("the prompt tokenizes to nothing")
        if self.max_prompt_tokens and len(token_ids) > self.max_prompt_tokens:
            raise BadRequestError(f"the prompt is {len(token_ids)} tokens (image features counted), more than "
                                  f"the {self.max_prompt_tokens} allowed (max_prompt_tokens)")
        if params.max_tokens is None:
            room = self.room(len(token_ids))
            if self.config.max_output_tokens:
                room = min(room, self.config.max_output_tokens)
            if params.min_tokens > room:
                raise BadRequestError(f"{min_tokens_problem(params.min_tokens, room)}: max_tokens was not given, "
                                      f"and {room} new tokens are what this request may have")
            params = dataclasses.replace(params, max_tokens=max(room, 1))   # < 1: check_fits names the problem
        problem = self.check_fits(len(token_ids), params.max_tokens)
        if problem:
            raise BadRequestError(problem)
        return Sequence(request_id, token_ids, params, spans, arrival_time=time.perf_counter())

    def _check_raw(self, prompt: Prompt, images, params: SamplingParams) -> None:
        """The cheap checks, before any decoding or tokenizing."""
        cfg = self.config
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRequestError("text_input is empty")
            what, texts = "text_input is", [prompt]
        else:
            if not prompt:
                raise BadRequestError("messages is empty")
            what, texts = "the messages are", [m.content for m in prompt]
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > cfg.max_text_bytes:
            raise BadRequestError(f"{what} {size} bytes, more than the {cfg.max_text_bytes} allowed (max_text_bytes)")
        if len(images) > cfg.max_images_per_request:
            raise BadRequestError(f"{len(images)} images given; this model takes at most "
                                  f"{cfg.max_images_per_request} (max_images_per_request)")
        for data in images:
            if len(data) > cfg.max_image_bytes:
                raise BadRequestError(f"image: {len(data)} bytes, more than the {cfg.max_image_bytes} allowed "
                                      "(max_image_bytes)")
        if cfg.max_output_tokens and params.max_tokens is not None and params.max_tokens > cfg.max_output_tokens:
            raise BadRequestError(f"max_tokens is {params.max_tokens}, more than the {cfg.max_output_tokens} "
                                  "allowed (max_output_tokens)")
