"""The engine: requests in (thread-safe), one `step()` at a time, RequestOutputs out."""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from bunny_backend.config import EngineConfig
from bunny_backend.engine.block_manager import BlockManager
from bunny_backend.engine.device import resolve_device, resolve_dtype
from bunny_backend.engine.kv_cache import num_kv_blocks
from bunny_backend.engine.model_runner import ModelRunner
from bunny_backend.engine.outputs import BadRequestError, EngineStats, RequestOutput
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.scheduler import Scheduler
from bunny_backend.engine.sequence import ImageSpan, Sequence
from bunny_backend.io.detokenizer import IncrementalDetokenizer
from bunny_backend.io.image import ImageError, decode_image, preprocess_image
from bunny_backend.io.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.model.bunny import IMAGE_PAD_ID
from bunny_backend.model.cpu_layout import use_cpu_linears
from bunny_backend.model.loader import load_model
from bunny_backend.ops.attention import get_backend

MAX_IMAGES = 1   # Bunny-v1.0 takes at most one image per request


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    sent_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.model_path)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.model = load_model(config.model_path, self.dtype, self.device)
        if self.device.type == "cpu":
            use_cpu_linears(self.model)
        text = self.model.config.text
        self.block_size = config.block_size or (128 if self.device.type == "npu" else 16)
        self.max_model_len = config.max_model_len or text.max_position_embeddings
        num_blocks = num_kv_blocks(config, text, self.block_size, self.max_model_len, self.dtype, self.device)
        backend_name = self.device.type if config.attention_backend == "auto" else config.attention_backend
        self.runner = ModelRunner(self.model, get_backend(backend_name), num_blocks, self.block_size,
                                  self.device, self.dtype)
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self._requests: dict[str, _Request] = {}
        self._incoming: list[_Request] = []
        self._aborts: list[str] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stats = EngineStats(kv_blocks_total=num_blocks)
        self._ids = itertools.count()

    # ---- submission (any thread) ---------------------------------------------------------------------------
    def add_request(self, request_id: str | None, text: str, images: list[bytes] = (), params: SamplingParams | None = None,
                    apply_chat_template: bool = True) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        seq = self._make_sequence(request_id, text, list(images), params or SamplingParams(), apply_chat_template)
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer, seq.params.stop))
        with self._lock:
            if request_id in self._requests:
                raise BadRequestError(f"request id {request_id!r} is already in flight")
            self._requests[request_id] = req
            self._incoming.append(req)
            self._wakeup.notify_all()
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wakeup.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not (self._incoming or self._aborts or self.scheduler.has_unfinished()):
                self._wakeup.wait(timeout)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def _make_sequence(self, request_id, text, images, params, apply_chat_template) -> Sequence:
        if not isinstance(text, str) or not text.strip():
            raise BadRequestError("text_input is empty")
        if len(images) > MAX_IMAGES:
            raise BadRequestError(f"{len(images)} images given; this model takes at most {MAX_IMAGES}")
        vision = self.model.config.vision
        try:
            pixels = [preprocess_image(decode_image(data), vision.image_size) for data in images]
            prompt = build_prompt(text, has_image=bool(images), apply_chat_template=apply_chat_template)
            ids = tokenize_prompt(self.tokenizer, prompt)
        except ImageError as e:
            raise BadRequestError(f"image: {e}") from None
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        token_ids, spans = [], []
        n_img = self.model.num_image_tokens
        image_iter = iter(zip(images, pixels))
        for tid in ids:
            if tid == IMAGE_TOKEN_INDEX:
                data, px = next(image_iter)
                spans.append(ImageSpan(offset=len(token_ids), length=n_img,
                                       content_hash=hashlib.sha256(data).digest(), pixel_values=px))
                token_ids += [IMAGE_PAD_ID] * n_img
            else:
                token_ids.append(tid)
        if not token_ids:
            raise BadRequestError("the prompt tokenizes to nothing")
        problem = self.scheduler.check_fits(len(token_ids), params.max_tokens)
        if problem:
            raise BadRequestError(problem)
        return Sequence(request_id, token_ids, params, spans, arrival_time=time.perf_counter())

    # ---- the loop (engine thread) --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
        for req in incoming:
            self.scheduler.add(req.seq)
            self._stats.prompt_tokens_total += req.seq.num_prompt_tokens
        outputs = [self._cancel(rid) for rid in aborts]
        outputs = [o for o in outputs if o is not None]
        if not self.scheduler.has_unfinished():
            return outputs
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return outputs
        sampled = self.runner.run(sched.seqs, sched.is_prefill, sched.num_new_tokens)
        self.scheduler.postprocess(sched, sampled)   # advances the cache, seals full blocks, appends tokens
        now = time.perf_counter()
        for seq, token in zip(sched.seqs, sampled):
            if token is not None:
                outputs.append(self._on_token(seq, token, now))
        return outputs

    def _on_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        """`token` has just been appended to `seq`: detokenize, check the stop conditions, build the output."""
        req = self._requests[seq.request_id]
        first = seq.num_completion_tokens == 1
        self._stats.generation_tokens_total += 1
        out = RequestOutput(seq.request_id, prompt_tokens=seq.num_prompt_tokens)
        if first:
            seq.first_token_time = now
            out.ttft_s = now - seq.arrival_time
        else:
            out.inter_token_latencies_s.append(now - seq.last_token_time)
        seq.last_token_time = now
        reason = None
        if token == self.eos_token_id and not seq.params.ignore_eos:
            reason = "stop"
        else:
            out.delta_text = req.detok.add(token)
            if req.detok.stopped:
                reason = "stop"
        if reason is None and seq.num_completion_tokens >= seq.params.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            out.delta_text += req.detok.finish()
            self._finish(seq, reason, out)
        out.delta_token_ids = seq.completion_token_ids[req.sent_tokens:]
        req.sent_tokens = seq.num_completion_tokens
        out.completion_tokens = seq.num_completion_tokens
        return out

    def _finish(self, seq: Sequence, reason: str, out: RequestOutput) -> None:
        self.scheduler.finish(seq, reason)
        out.finished, out.finish_reason = True, reason
        self._stats.requests_finished[reason] = self._stats.requests_finished.get(reason, 0) + 1
        with self._lock:
            self._requests.pop(seq.request_id, None)

    def _cancel(self, request_id: str) -> RequestOutput | None:
        req = self._requests.get(request_id)
        if req is None:
            return None
        seq = req.seq
        self.scheduler.abort(request_id)
        out = RequestOutput(request_id, prompt_tokens=seq.num_prompt_tokens,
                            completion_tokens=seq.num_completion_tokens, finished=True, finish_reason="cancelled")
        self._stats.requests_finished["cancelled"] = self._stats.requests_finished.get("cancelled", 0) + 1
        with self._lock:
            self._requests.pop(request_id, None)
        return out

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected error in step(): end every request in flight with an error output."""
        outputs = []
        for rid in list(self._requests):
            req = self._requests[rid]
            self.scheduler.abort(rid)
            outputs.append(RequestOutput(rid, finished=True, finish_reason="error", error=message,
                                         prompt_tokens=req.seq.num_prompt_tokens,
                                         completion_tokens=req.seq.num_completion_tokens))
        with self._lock:
            self._requests.clear()
            self._incoming.clear()
        return outputs

    def stats(self) -> EngineStats:
        s = self._stats
        bm = self.block_manager
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_blocks_used = bm.num_used_blocks
        s.prefix_cache_hit_tokens, s.prefix_cache_query_tokens = bm.prefix_hit_tokens_total, bm.prefix_query_tokens_total
        s.num_preemptions = self.scheduler.num_preemptions
        return s
