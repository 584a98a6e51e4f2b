"""Stand-ins for the python backend's `triton_python_backend_utils` and for LLMEngine, to drive model.py in-process."""
from __future__ import annotations

import threading
import time
import types

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from bunny_backend.engine.outputs import BadRequestError, EngineDeadError, EngineStats, RequestOutput, ServerBusyError

FINAL = 1


class Tensor:
    raw_memory_reads_as = staticmethod(lambda array: array)   # what the stub's C++ makes of a tensor's raw memory

    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    @classmethod
    def from_dlpack(cls, name, obj):
        """A tensor over another's memory, read back through the stub's C++ (Triton 2.51 garbles it under numpy 2:
        tests set `raw_memory_reads_as` to do the same)."""
        return cls(name, cls.raw_memory_reads_as(np.from_dlpack(obj)))

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    INTERNAL, INVALID_ARG, CANCELLED, UNAVAILABLE = 13, 3, 1, 14

    def __init__(self, message, code=13):
        self._message, self.code = message, code

    def message(self):
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.tensors = {t.name(): t.as_numpy() for t in (output_tensors or [])}
        self.error = error


class Sender:
    """Records (response, flags); `cancelled` is what is_cancelled() answers.

    Triton frees a sender's response factory with its final response, and is_cancelled() on it then crashes
    tritonserver: here such a call is counted in `asked_after_final`. `ask_delay_s` makes is_cancelled() slow,
    as its round trip to the server process can be."""

    def __init__(self):
        self.responses: list[tuple[InferenceResponse | None, int]] = []
        self.cancelled = False
        self.done = threading.Event()
        self.asked_after_final = 0
        self.asks = 0
        self.ask_delay_s = 0.0
        self.gate: threading.Event | None = None   # when set, send() waits for it (a slow trip to the server)
        self._sent = threading.Condition()

    def send(self, response=None, flags=0):
        if self.gate is not None:
            assert self.gate.wait(10), "the gate was never opened"
        assert not self.done.is_set(), "response sent after the final one"
        with self._sent:
            self.responses.append((response, flags))
            self._sent.notify_all()
        if flags & FINAL:
            self.done.set()

    def wait_for_responses(self, n: int, timeout: float = 10.0) -> None:
        """Until `n` responses were sent (no sleep: woken by send())."""
        with self._sent:
            assert self._sent.wait_for(lambda: len(self.responses) >= n, timeout), \
                f"{len(self.responses)} responses sent, not {n}"

    def is_cancelled(self):
        self.asks += 1
        if self.done.is_set():
            self.asked_after_final += 1
        time.sleep(self.ask_delay_s)
        return self.cancelled

    def wait(self, timeout=10.0):
        assert self.done.wait(timeout), "no final response"
        return self

    @property
    def finals(self):
        return [r for r, f in self.responses if f & FINAL]


class Request:
    _ids = iter(range(1, 1 << 30))

    def __init__(self, **inputs):
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.sender = Sender()
        self.id = f"client-{next(Request._ids)}"

    def request_id(self):
        return self.id

    def get_response_sender(self):
        return self.sender


class Metric:
    def __init__(self, labels, buckets=None):
        self.labels, self.buckets, self.value, self.observations = labels, buckets, 0.0, []
        self.sets = 0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v
        self.sets += 1

    def observe(self, v):
        self.observations.append(v)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    families: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        MetricFamily.families[name] = self

    def Metric(self, labels=None, buckets=None):
        assert (buckets is not None) == (self.kind == self.HISTOGRAM)
        m = Metric(labels or {}, buckets)
        self.metrics.append(m)
        return m


class Logger:
    lines: list[str] = []

    @classmethod
    def _log(cls, msg):
        cls.lines.append(msg)

    log_info = log_warn = log_error = log_verbose = _log


def make_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.TritonError, m.InferenceResponse, m.MetricFamily, m.Logger = (
        Tensor, TritonError, InferenceResponse, MetricFamily, Logger)
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    # tritonclient's (de)serializers: the wire format of BYTES tensors, written apart from the backend's
    m.serialize_byte_tensor = lambda array: serialize_byte_tensor(array).item()
    m.deserialize_bytes_tensor = lambda buffer: deserialize_bytes_tensor(np.asarray(buffer, np.uint8).tobytes())
    m.get_input_tensor_by_name = lambda req, name: Tensor(name, req.inputs[name]) if name in req.inputs else None
    m.using_decoupled_model_transaction_policy = (
        lambda cfg: cfg.get("model_transaction_policy", {}).get("decoupled", False))
    MetricFamily.families = {}
    Tensor.raw_memory_reads_as = staticmethod(lambda array: array)
    return m


class FakeEngine:
    """One token per step per request, token id = step count; text "t<id> "; "bad" text is refused."""

    def __init__(self, config, placement=None):
        self.config, self.placement = config, placement
        self.tokenizer = None     # the adapter's token bytes read it only for requests that ask for logprobs
        self.requests: dict[str, dict] = {}
        self.aborts: list[str] = []
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.fail_next_step = False
        self.step_delay = 0.001
        self.refuse_delay = 0.0   # how long add_request takes to refuse a "bad" request
        self.accept_delay = 0.0   # how long add_request takes to accept one (decoding images, tokenizing)
        self.hold_aborts = False  # leave aborts untaken, the requests running (an engine behind on its aborts)
        self.st = EngineStats(kv_blocks_total=64)
        self.num_steps = 0                # steps that ran to their end; wait_for_steps() waits on them
        self._stepped = threading.Condition()
        self.dead: str | None = None      # check_alive() raises EngineDeadError with it
        self.shut_down = False

    def add_request(self, request_id, text, images=(), params=None, apply_chat_template=True):
        if text == "bad":
            time.sleep(self.refuse_delay)
            raise BadRequestError("the prompt is longer than the context")
        if text == "busy":
            raise ServerBusyError("server busy: 9 requests in flight")
        if text == "crash":
            raise KeyError("unexpected")
        time.sleep(self.accept_delay)
        with self.lock:
            self.requests[request_id] = {"params": params, "n": 0, "prompt": len(text.split())}
            self.wake.notify_all()
        return request_id

    def abort(self, request_id):
        with self.lock:
            self.aborts.append(request_id)

    def has_unfinished(self):
        with self.lock:
            return bool(self.requests)

    def check_alive(self):
        if self.dead:
            raise EngineDeadError(self.dead)

    def shutdown(self):
        self.shut_down = True

    def rank_summary(self):
        return ["tensor-parallel rank 0 of 1: fake"]

    def wait_for_work(self, timeout):
        with self.lock:
            if not self.requests:
                self.wake.wait(timeout)

    def step(self):
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outs = []
        with self.lock:
            aborts, self.aborts = ([], self.aborts) if self.hold_aborts else (self.aborts, [])
            for rid in aborts:
                r = self.requests.pop(rid, None)
                if r is not None:
                    outs.append(RequestOutput(rid, finished=True, finish_reason="cancelled",
                                              prompt_tokens=r["prompt"], completion_tokens=r["n"]))
            for rid, r in list(self.requests.items()):
                r["n"] += 1
                out = RequestOutput(rid, delta_text=f"t{r['n']} ", delta_token_ids=[r["n"]], prompt_tokens=r["prompt"],
                                    completion_tokens=r["n"], ttft_s=0.01 if r["n"] == 1 else None,
                                    inter_token_latencies_s=[] if r["n"] == 1 else [0.002])
                self.st.generation_tokens_total += 1
                if r["n"] >= r["params"].max_tokens:
                    out.finished, out.finish_reason = True, "length"
                    del self.requests[rid]
                outs.append(out)
        with self._stepped:
            self.num_steps += 1
            self._stepped.notify_all()
        return outs

    def wait_for_steps(self, n: int, timeout: float = 10.0) -> int:
        """Until `n` more steps ran from now (no sleep: woken by step()); the step count then."""
        with self._stepped:
            want = self.num_steps + n
            assert self._stepped.wait_for(lambda: self.num_steps >= want, timeout), f"the engine did not step {n} times"
            return self.num_steps

    def fail_all(self, message):
        with self.lock:
            outs = [RequestOutput(rid, finished=True, finish_reason="error", error=message) for rid in self.requests]
            self.requests.clear()
        return outs

    def stats(self):
        with self.lock:
            self.st.num_running = len(self.requests)
            self.st.kv_blocks_used = 2 * len(self.requests)
        return self.st
