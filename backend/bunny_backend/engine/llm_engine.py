"""The engine: requests in (thread-safe), one `step()` at a time, RequestOutputs out.

With tensor_parallel_size N > 1 this engine is rank 0: it spawns ranks 1..N-1 (engine/executor/tp_group.py), loads its own
shard, and keeps the scheduler, the sampler and the detokenizer; the workers only run steps. If one of them dies,
`step()` and `check_alive()` raise EngineDeadError: the caller fails every request and takes the model down.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass

from bunny_backend.config import EngineConfig
from bunny_backend.engine import step_hooks
from bunny_backend.engine.core.block_manager import BlockManager
from bunny_backend.engine.core.request_builder import Prompt, RequestBuilder
from bunny_backend.engine.core.scheduler import Scheduler, SchedulerOutput
from bunny_backend.engine.core.sequence import Sequence
from bunny_backend.engine.outputs import (BadRequestError, EngineDeadError, EngineStats, RequestOutput,
                                          ServerBusyError, TokenLogprobs)
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.structured_output import GrammarCompiler
from bunny_backend.engine.worker.cpu_threads import thread_governor
from bunny_backend.engine.worker.device import DevicePlan, Placement
from bunny_backend.engine.worker.encoder_cache import EncoderCache
from bunny_backend.engine.worker.encoder_runner import EncoderRunner
from bunny_backend.engine.worker.kv_cache import fit_max_num_seqs, num_kv_blocks
from bunny_backend.engine.worker.model_runner import ModelRunner
from bunny_backend.engine.worker.warm_up import warm_up
from bunny_backend.io.detokenizer import IncrementalDetokenizer
from bunny_backend.io.tokenizer import eos_token_ids, load_tokenizer
from bunny_backend.model.config import BunnyConfig
from bunny_backend.model.loader import load_model
from bunny_backend.model.quantized_linear import check_tensor_parallel
from bunny_backend.model.sharding import TextShards
from bunny_backend.ops.attention import get_backend
from bunny_backend.utils.distributed import SINGLE, TensorParallel
from bunny_backend.utils.memory import ResidentMemory

MAX_QUARANTINES = 3   # a sequence whose batches failed this often is failed itself
log = logging.getLogger("bunny.engine")


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    sent_tokens: int = 0
    unsent_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, placement: Placement = Placement()):
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        plan = DevicePlan.resolve(config, placement)
        plan.enter()
        self._asked_max_num_seqs = config.max_num_seqs > 0
        config = dataclasses.replace(config, max_num_seqs=plan.max_num_seqs,
                                     max_queued_requests=plan.max_queued_requests,
                                     max_num_batched_tokens=plan.max_num_batched_tokens)
        self.config = config
        self.device, self.dtype, self.block_size = plan.device, plan.dtype, plan.block_size
        self.tokenizer = load_tokenizer(config.model_path)
        self.eos_token_ids = frozenset(eos_token_ids(config.model_path, self.tokenizer))
        model_config = BunnyConfig.from_pretrained(config.model_path)
        TextShards.plan(model_config.text, TensorParallel(0, config.tensor_parallel_size))   # sizes that divide
        check_tensor_parallel(config.quantization, model_config.text, config.tensor_parallel_size)
        self.max_model_len = config.max_model_len or model_config.context_length
        max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.workers = None
        try:
            if config.tensor_parallel_size > 1:
                from bunny_backend.engine.executor.tp_group import WorkerGroup
                self.workers = WorkerGroup(config, plan)
            memory = ResidentMemory(self.device)
            self.model = load_model(config.model_path, self.dtype, self.device,
                                    self.workers.tp if self.workers else SINGLE)
            plan.quantize(self.model)
            self.memory_reports = [memory.report(self.model)]   # one per rank
            plan.prepare_model(self.model)
            backend = get_backend(plan.attention_backend, min(config.max_num_batched_tokens, self.max_model_len))
            num_blocks = num_kv_blocks(config, model_config.text, self.block_size, self.max_model_len, self.dtype,
                                       self.device, backend.workspace_bytes(self.dtype),
                                       self.model.shards.num_kv_heads, config.encoder_cache_bytes)
            if self.workers:
                ready = self.workers.wait_ready()
                num_blocks = min([num_blocks] + [blocks for blocks, _ in ready])
                self.memory_reports += [report for _, report in ready]
                self.workers.start(num_blocks)
                self.workers.add_failure_callback(self._on_worker_death)
            self.config = config = fit_max_num_seqs(config, self.block_size * num_blocks, self.max_model_len,
                                                    self.device, asked=self._asked_max_num_seqs)
            self.runner = ModelRunner(self.model, backend, num_blocks, self.block_size, self.device, self.dtype,
                                      graph_capture=plan.graph_capture(model_config.text.head_dim),
                                      max_graph_batch=config.max_num_seqs, max_blocks_per_seq=max_blocks_per_seq,
                                      max_graph_tokens=config.max_num_batched_tokens,
                                      workers=self.workers, eos_token_ids=self.eos_token_ids)
            if plan.warms_up:
                log.info("bunny: warm-up at load took %.1f s",
                         warm_up(self.runner, self.model, config.max_num_seqs))
        except BaseException:
            self.shutdown()
            raise
        self.encoder = EncoderRunner(self.model, EncoderCache(config.encoder_cache_bytes), self.device)
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len, self.encoder.cache,
                                   plan.max_prefill_tokens_while_decoding, plan.prefill_chunks_while_decoding)
        self.builder = RequestBuilder(config, self.tokenizer, self.model.config.vision.image_size,
                                      self.model.num_image_tokens, self.max_model_len, self.scheduler.check_fits,
                                      self.scheduler.room)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.shards.vocab_size, self.eos_token_ids)
        self._max_in_flight = config.max_num_seqs + config.max_queued_requests
        self._threads = thread_governor(plan)
        self._hooks = step_hooks.from_environment()   # None unless BUNNY_ENGINE_HOOKS names some
        self._requests: dict[str, _Request] = {}
        self._incoming: list[_Request] = []
        self._aborts: list[str] = []
        self._stats = EngineStats(kv_blocks_total=num_blocks)
        self._ids = itertools.count()
        # Draws the seed of each accepted request that has none, in arrival order: the same engine seed and the
        # same requests in the same order give the same outputs.
        self._seeds = random.Random(config.seed)

    # ---- submission (any thread) ---------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: Prompt, images: list[bytes] = (),
                    params: SamplingParams | None = None, apply_chat_template: bool = True) -> str:
        """prompt: the user's text (the whole prompt when apply_chat_template is false) or a list of Messages."""
        request_id = request_id or f"req-{next(self._ids)}"
        self._check_not_busy()   # before decoding images: an overloaded server should refuse cheaply
        params = params or SamplingParams()
        grammar = self.grammars.matcher(params.response_format)   # compiled here, off the engine thread
        seq = self.builder.build(request_id, prompt, list(images), params, apply_chat_template)
        seq.grammar = grammar
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer, seq.params.stop))
        if self._hooks:
            self._hooks.on_request(seq, prompt)
        with self._lock:
            if request_id in self._requests:
                raise BadRequestError(f"request id {request_id!r} is already in flight")
            self._check_not_busy()
            if seq.seed is None:
                seq.set_seed(self._seeds.getrandbits(63))
            self._requests[request_id] = req
            self._incoming.append(req)
            self._wakeup.notify_all()
        return request_id

    def _check_not_busy(self) -> None:
        if len(self._requests) >= self._max_in_flight:
            raise ServerBusyError(f"server busy: {len(self._requests)} requests in flight, the limit is "
                                  f"{self._max_in_flight} (max_num_seqs + max_queued_requests); retry later")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
            self._wakeup.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not (self._incoming or self._aborts or self.scheduler.has_unfinished()):
                self._wakeup.wait(timeout)

    def has_unfinished(self) -> bool:
        """Requests in flight, or aborts not yet taken in (else wait_for_work would return at once, forever, after
        an abort of a request that had just finished)."""
        with self._lock:
            return bool(self._requests or self._aborts)

    # ---- the loop (engine thread) --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; returns the outputs it produced. A forward that raises fails only the request
        that causes it: a batch of one ends its request with an error, a larger batch is retried one request at a
        time (Scheduler.quarantine). Exceptions outside the forward still propagate (see fail_all)."""
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
        try:
            if self._hooks:
                self._hooks.before_step(sched.seqs)
            self.encoder.run(sched.images)
            sampled = self._run(sched)
        except EngineDeadError:
            raise
        except Exception as e:   # noqa: BLE001 - isolate the request that broke the step, keep serving
            return outputs + self._on_step_failure(sched, e)
        self.scheduler.postprocess(sched, sampled.tokens)   # advances the cache, seals full blocks, appends tokens
        now = time.perf_counter()
        for seq, token, logprobs in zip(sched.seqs, sampled.tokens, sampled.logprobs):
            if token is not None:
                try:
                    outputs.append(self._on_token(seq, token, logprobs, now))
                except Exception as e:   # noqa: BLE001 - e.g. a detokenizer failure: this request only
                    log.exception("bunny: output processing failed for %s", seq.request_id)
                    outputs.append(self._fail(seq, f"engine error: {type(e).__name__}: {e}"))
        return outputs

    def _run(self, sched: SchedulerOutput):
        if self._threads is None:
            return self.runner.run(sched)
        self._threads.step_starts((sched.num_decodes, len(sched.seqs), sum(sched.num_new_tokens)), time.perf_counter())
        sampled = self.runner.run(sched)
        self._threads.step_ran(time.perf_counter())
        return sampled

    def _on_step_failure(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """A batch of one fails its request; a larger batch is quarantined so each request is retried alone."""
        message = f"engine error: {type(error).__name__}: {error}"
        log.warning("bunny: step of %d sequence(s) failed: %s", len(sched.seqs), message)
        alone = len(sched.seqs) == 1
        culprits = [s for s in sched.seqs if alone or s.num_quarantines >= MAX_QUARANTINES]
        if not alone:
            self.scheduler.quarantine(SchedulerOutput([s for s in sched.seqs if s not in culprits]))
        return [self._fail(seq, message) for seq in culprits]

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        out = RequestOutput(seq.request_id, prompt_tokens=seq.num_prompt_tokens,
                            completion_tokens=seq.num_completion_tokens, error=message)
        self._finish(seq, "error", out)
        return out

    def _on_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None, now: float) -> RequestOutput:
        """`token` has just been appended to `seq`: detokenize, check the stop conditions, build the output.
        Before min_tokens new tokens stop strings are not looked for (and EOS could not be sampled)."""
        req = self._requests[seq.request_id]
        if logprobs is not None:
            req.unsent_logprobs.append(logprobs)
        first = seq.num_completion_tokens == 1
        self._stats.generation_tokens_total += 1
        out = RequestOutput(seq.request_id, prompt_tokens=seq.num_prompt_tokens)
        if first:
            out.ttft_s = now - seq.arrival_time
            seq.first_token_time = now
        else:
            out.inter_token_latencies_s.append(now - seq.last_token_time)
        seq.last_token_time = now
        reason = None
        if seq.grammar is not None and not seq.grammar.accept(token):
            raise RuntimeError(f"the response_format's grammar does not allow token {token}")
        grammar_ended = seq.grammar is not None and seq.grammar.ended   # even under ignore_eos
        if grammar_ended or (token in self.eos_token_ids and not seq.params.ignore_eos):
            reason = "stop"
        else:
            out.delta_text = req.detok.add(token, match_stop=seq.num_completion_tokens >= seq.params.min_tokens)
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
        if seq.params.logprobs:
            out.logprobs, req.unsent_logprobs = req.unsent_logprobs, []
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

    # ---- tensor parallelism --------------------------------------------------------------------------------
    def rank_summary(self) -> list[str]:
        """One line per tensor-parallel rank: its weights, and the memory loading them took (for the log)."""
        mib = 1 << 20
        return [f"tensor-parallel rank {rank} of {len(self.memory_reports)}: weights {r['weights_bytes'] / mib:.1f} "
                f"MiB, resident +{r['resident_bytes'] / mib:.1f} MiB and peak +{r['peak_bytes'] / mib:.1f} MiB while "
                f"loading, {self.runner.num_blocks} KV blocks of its own KV heads"
                for rank, r in enumerate(self.memory_reports)]

    def _on_worker_death(self, message: str) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def check_alive(self) -> None:
        """EngineDeadError if a tensor-parallel worker died (cheap: call it every loop)."""
        if self.workers is not None and self.workers.failure:
            raise EngineDeadError(self.workers.failure)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine runs no more steps)."""
        if getattr(self, "workers", None) is not None:
            self.workers.shutdown()

    def stats(self) -> EngineStats:
        s = self._stats
        bm = self.block_manager
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_blocks_used = bm.num_used_blocks
        s.prefix_cache_hit_tokens, s.prefix_cache_query_tokens = bm.prefix_hit_tokens_total, bm.prefix_query_tokens_total
        s.num_preemptions = self.scheduler.num_preemptions
        cache = self.encoder.cache
        s.encoder_cache_hits, s.encoder_cache_misses, s.encoder_cache_bytes = cache.hits, cache.misses, cache.num_bytes
        s.encoder_images_total, s.encoder_seconds_total = self.encoder.images_encoded, self.encoder.seconds
        return s
