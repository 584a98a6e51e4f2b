"""Triton python-backend adapter for Bunny (decoupled; docs/api/triton-model.md). No model logic here.

`execute` validates each request (bunny_backend.stub.request_io) and hands it to the engine, returning at once.
One engine thread loops `step()` and merges each step's outputs into the handover (bunny_backend.stub.handover):
one pending entry per request. A responder thread takes what is due and sends it through each request's response
sender (when streaming, one response per request per pass carrying every token made since the last, else one
response with everything), asks the senders about cancellations and publishes the metrics: every one of those is
a round trip to the server process, and none of them may hold up the next step. Every request ends with exactly
one response flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL, carrying its last tokens: on success, on a bad request,
on cancellation, on an engine error, and at unload.

Each Triton instance (instance_group count) is its own stub process with its own engine (bunny_backend.stub.instance
says where it runs). When the engine can run no more (a tensor-parallel worker died), every request in flight
gets an error and this process ends, so that bunny-serve's watchdog unloads the model and stops the server.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import itertools
import json
import math
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils

from bunny_backend.config import EngineConfig
from bunny_backend.engine.llm_engine import LLMEngine
from bunny_backend.engine.outputs import BadRequestError, EngineDeadError, RequestOutput, ServerBusyError
from bunny_backend.io import wire_schema
from bunny_backend.io.token_bytes import TokenBytes
from bunny_backend.stub.bytes_probe import check_bytes_round_trip
from bunny_backend.stub.engine_log import forward_engine_logs
from bunny_backend.stub.engine_thread import start_engine_thread
from bunny_backend.stub.handover import Handover, Ready
from bunny_backend.stub.instance import placement
from bunny_backend.stub.metrics import BunnyMetrics
from bunny_backend.stub.request_io import (INPUT_NAMES, InvalidInput, parse_request, requested_outputs,
                                           response_arrays)
from bunny_backend.stub.timeline import Timeline

IDLE_WAIT_S = 0.05       # engine thread wake-up period when idle (stop flag, stats snapshots)
RESPONDER_TICK_S = 0.02  # the responder wakes at least this often, for the cancellation sweep
CANCEL_SWEEP_S = 0.1     # every live request's sender is asked whether its client cancelled once per this period,
                         # spread over the ticks: each ask is a round trip to the server process
STATS_PERIOD_S = 0.1     # how often gauges and counters are published
EXIT_GRACE_S = 1.0       # after a dead engine's error responses are sent, before this process ends
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class _InFlight:
    sender: object
    stream: bool
    client_id: str = ""      # the client's request id (timeline only)
    outputs: frozenset | None = None   # the output names the client asked for; None: all of them
    logprobs: int = 0        # the top alternatives asked with each token's logprob; 0: no logprob outputs
    accepted: bool = False   # the engine has it: an abort before that would find no request and be lost
    cancelled: bool = False


_WIRE_CODES = {"INVALID_ARG": "invalid_argument", "UNAVAILABLE": "unavailable", "INTERNAL": "internal"}


def _error(message: str, code_name: str = "INTERNAL"):
    """A TritonError whose message starts with the wire code too (a gRPC stream client sees no status code)."""
    message = wire_schema.tag_error(_WIRE_CODES[code_name], message)
    code = getattr(pb_utils.TritonError, code_name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args):
        check_bytes_round_trip(pb_utils)
        faulthandler.register(signal.SIGUSR1, all_threads=True)   # `kill -USR1 <stub pid>`: each thread's stack, logged
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the bunny model must be decoupled (model_transaction_policy { decoupled: true })")
        params = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}
        self.config = EngineConfig.from_parameters(params)
        if not self.config.model_path:
            raise ValueError("parameter model_path is empty: set it in config.pbtxt or start with bunny-serve --model-path")
        self.log = pb_utils.Logger
        forward_engine_logs(self.log)
        where = placement(args, model_config, self.config.tensor_parallel_size)
        # built on the thread that steps it (stub/engine_thread.py says why); it starts looping at _engine_go
        self.engine, self._thread, self._engine_go = start_engine_thread(lambda: LLMEngine(self.config, where),
                                                                         self._loop)
        self._token_bytes = TokenBytes(self.engine.tokenizer)   # the responder thread's only
        self.metrics = BunnyMetrics(pb_utils, args.get("model_name", "bunny"), args.get("model_instance_name", ""))
        self._down: str | None = None            # why the engine can run no more
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._rejected = 0                       # bad requests not yet counted in the metrics
        self._next_stats = 0.0                   # the engine thread's clock for stats snapshots
        self._cancel_turn = 0                    # where the next cancellation asks start among the live requests
        self._last_sweep = time.monotonic()
        self._stop = threading.Event()
        self._timeline = Timeline.from_environment()
        self._handover = Handover(self.config.stream_interval)
        self._responder = threading.Thread(target=self._respond_loop, name="bunny-responder", daemon=True)
        self._responder.start()
        self._engine_go.set()
        for line in self.engine.rank_summary():
            self.log.log_info(f"bunny: {line}")
        self.log.log_info(f"bunny: engine ready ({self.config.to_dict()})")

    # ---- requests in (Triton's thread) ---------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._submit(request, sender)
            except Exception as e:   # noqa: BLE001 - whatever happens, the request gets its final response
                self.log.log_error(f"bunny: submitting a request failed: {traceback.format_exc()}")
                self._reject(sender, f"internal error: {type(e).__name__}: {e}", "INTERNAL")
        return None

    def _submit(self, request, sender) -> None:
        t_arrive = time.perf_counter()
        if self._down:
            return self._reject(sender, f"model unavailable: {self._down}", "UNAVAILABLE")
        if not self._thread.is_alive():
            return self._reject(sender, "the engine thread has stopped; restart the server", "UNAVAILABLE")
        try:
            inputs = {}
            for name in INPUT_NAMES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if tensor is None else tensor.as_numpy()
            parsed = parse_request(inputs)
        except InvalidInput as e:
            return self._reject(sender, str(e))
        request_id = str(next(self._ids))
        client_id = request.request_id() if self._timeline.enabled else ""
        with self._lock:
            self._inflight[request_id] = _InFlight(sender, parsed.stream, client_id, requested_outputs(request),
                                                   parsed.params.logprobs)
        self._handover.open(request_id, parsed.stream)
        try:
            self.engine.add_request(request_id, parsed.prompt, parsed.images, parsed.params, parsed.apply_chat_template)
        except Exception as e:
            with self._lock:
                self._inflight.pop(request_id, None)
            self._handover.discard(request_id)
            if isinstance(e, ServerBusyError):
                return self._reject(sender, str(e), "UNAVAILABLE")
            if isinstance(e, BadRequestError):
                return self._reject(sender, str(e))
            self.log.log_error(f"bunny: add_request failed: {traceback.format_exc()}")
            self._reject(sender, f"internal error: {type(e).__name__}: {e}", "INTERNAL")
            return
        with self._lock:
            f = self._inflight.get(request_id)
            if f is not None:
                f.accepted = True
        self._timeline.record(ev="accept", rid=client_id, t0=t_arrive, t1=time.perf_counter())

    def _reject(self, sender, message: str, code_name: str = "INVALID_ARG") -> None:
        with self._lock:
            self._rejected += 1
        self._send(sender, pb_utils.InferenceResponse(error=_error(message, code_name)), FINAL)

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.engine.check_alive()
                if not self.engine.has_unfinished():
                    self._handover.merge([], time.perf_counter(), self._stats_due())
                    self._timeline.flush()
                    self.engine.wait_for_work(IDLE_WAIT_S)
                    continue
                t0 = time.perf_counter()
                outputs = self.engine.step()   # isolates a failing request itself (engine.step docstring)
                t1 = time.perf_counter()
                self._timeline.record(ev="step", t0=t0, t1=t1, n=len(outputs))
                # a request's counters (its tokens, its freed blocks) go out before its final response does
                self._handover.merge(outputs, t1, self._stats_due(now=any(o.finished for o in outputs)))
            except EngineDeadError as e:
                return self._go_down(str(e))
            except Exception as e:   # noqa: BLE001 - outside any one request: fail what is in flight
                self.log.log_error(f"bunny: engine step failed: {traceback.format_exc()}")
                self._handover.merge(self._fail_all(f"engine error: {type(e).__name__}: {e}"), time.perf_counter())
                time.sleep(0.01)

    def _stats_due(self, now: bool = False):
        """A copy of the engine's stats (read on the engine thread) when it is time to publish them, else None."""
        t = time.monotonic()
        if not (now or t >= self._next_stats):
            return None
        self._next_stats = t + STATS_PERIOD_S
        return dataclasses.replace(self.engine.stats())

    # ---- the responder thread ------------------------------------------------------------------------------
    def _respond_loop(self) -> None:
        """What is due becomes responses, in the order the engine produced it; cancellations; metrics."""
        while True:
            stopping = self._handover.stopping
            self._respond_to(self._handover.take(RESPONDER_TICK_S))
            self._sweep_cancellations()
            if stopping and self._handover.idle():
                return

    def _respond_to(self, taken) -> None:
        self._publish(taken)
        for ready in taken.ready:
            self._deliver(ready)

    def _drain_responder(self) -> None:
        """Let the responder send what the engine thread handed over, then end it (unload, a dead engine)."""
        self._handover.stop()
        self._responder.join(timeout=60)

    def _go_down(self, reason: str) -> None:
        """The engine can run no more: fail what is in flight, stop the engine's workers, end this process."""
        self._down = reason
        self.log.log_error(f"bunny: {reason}. The model is down: failing the requests in flight and ending this "
                           "instance's process (bunny-serve then unloads the model and exits 1); restart the server")
        self._handover.merge(self._fail_all(f"model unavailable: {reason}"), time.perf_counter())
        self._drain_responder()
        try:
            self.engine.shutdown()
        except Exception:
            self.log.log_error(f"bunny: stopping the engine failed: {traceback.format_exc()}")
        time.sleep(EXIT_GRACE_S)
        os._exit(1)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        try:
            outputs = self.engine.fail_all(message)
        except Exception:
            outputs = []
        with self._lock:   # anything the engine did not know about fails too
            known = {o.request_id for o in outputs}
            outputs += [RequestOutput(rid, finished=True, finish_reason="error", error=message)
                        for rid in self._inflight if rid not in known]
        return outputs

    def _sweep_cancellations(self) -> None:
        """Ask the live requests' senders, in turn, so that each is asked once per CANCEL_SWEEP_S. Outside the
        lock `execute` needs: only this thread sends an accepted request's final response, after which Triton
        frees its response factory (asking a freed one crashes tritonserver: SIGSEGV in
        TRITONBACKEND_ResponseFactoryIsCancelled), so a sender asked here is still alive."""
        now = time.monotonic()
        share, self._last_sweep = min(1.0, (now - self._last_sweep) / CANCEL_SWEEP_S), now
        with self._lock:
            live = [(rid, f) for rid, f in self._inflight.items() if f.accepted and not f.cancelled]
        if not live:
            return
        start = self._cancel_turn % len(live)
        turn = (live[start:] + live[:start])[:max(1, math.ceil(len(live) * share))]
        self._cancel_turn = start + len(turn)
        for rid, f in turn:
            try:
                cancelled = f.sender.is_cancelled()
            except Exception:
                cancelled = False
            if cancelled:
                f.cancelled = True
                self.engine.abort(rid)

    def _deliver(self, ready: Ready) -> None:
        with self._lock:
            f = self._inflight.pop(ready.request_id, None) if ready.final else self._inflight.get(ready.request_id)
        if f is None or (f.cancelled and not ready.final):
            return   # its client is gone: only the final response, once the engine has taken the abort in
        try:
            t0 = time.perf_counter()
            self._respond(f, ready)
            if self._timeline.enabled:
                self._timeline.record(ev="send", rid=f.client_id, k=ready.completion_tokens, n=len(ready.token_ids),
                                      handed=ready.handed, t0=t0, t1=time.perf_counter(), final=ready.final)
        except Exception as e:   # noqa: BLE001 - this request ends with an error; the loop goes on
            self.log.log_error(f"bunny: building a response failed: {traceback.format_exc()}")
            if not ready.final:
                with self._lock:
                    self._inflight.pop(ready.request_id, None)
                self._handover.discard(ready.request_id)
                self.engine.abort(ready.request_id)
            self._send(f.sender, pb_utils.InferenceResponse(error=_error(f"internal error: {e}")), FINAL)

    def _respond(self, f: _InFlight, ready: Ready) -> None:
        if ready.final and ready.finish_reason == "error":
            # a request ends with an error when its step failed (internal), or when the engine is down (_go_down)
            code_name = "UNAVAILABLE" if self._down else "INTERNAL"
            self._send(f.sender, pb_utils.InferenceResponse(error=_error(ready.error or "internal error", code_name)),
                       FINAL)
            return
        logprobs = (ready.logprobs or []) if f.logprobs else None
        arrays = response_arrays(ready.text, ready.token_ids, ready.finish_reason or "", ready.prompt_tokens,
                                 ready.completion_tokens, f.outputs, logprobs, f.logprobs, self._token_bytes)
        response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])
        self._send(f.sender, response, FINAL if ready.final else 0)

    def _send(self, sender, response, flags: int) -> None:
        try:
            sender.send(response, flags=flags)
        except Exception as e:   # e.g. the client went away; never let one request hurt the others
            self.log.log_warn(f"bunny: could not send a response: {e}")

    def _publish(self, taken) -> None:
        """Counts first (finals this pass, refusals, latencies), published before the responses go out."""
        try:
            with self._lock:
                rejected, self._rejected = self._rejected, 0
            if rejected:
                self.metrics.on_finished("error", rejected)
            for ready in taken.ready:
                if ready.final:
                    self.metrics.on_finished(ready.finish_reason or "error")
            self.metrics.observe(taken.ttfts, taken.itls)
            self.metrics.publish(taken.stats)
        except Exception:
            self.log.log_warn(f"bunny: publishing metrics failed: {traceback.format_exc()}")

    # ---- unload --------------------------------------------------------------------------------------------
    def finalize(self):
        self._stop.set()
        self._thread.join(timeout=60)
        self._drain_responder()
        with self._lock:
            left = list(self._inflight)
        for rid in left:
            self.engine.abort(rid)
        try:
            outputs = self.engine.step() if left else []   # emits the "cancelled" finals
        except Exception:
            outputs = []
        with self._lock:   # whatever the engine did not answer still gets its final response
            answered = {o.request_id for o in outputs if o.finished}
            outputs += [RequestOutput(rid, finished=True, finish_reason="cancelled")
                        for rid in self._inflight if rid not in answered]
        self._handover.merge(outputs, time.perf_counter(), dataclasses.replace(self.engine.stats()))
        self._respond_to(self._handover.take(0))
        self._timeline.flush()
        self.metrics.close()
        try:
            self.engine.shutdown()
        except Exception:
            self.log.log_error(f"bunny: stopping the engine failed: {traceback.format_exc()}")
        self.log.log_info("bunny: engine stopped")
