"""A tiny in-process stand-in for Triton's gRPC service (KServe v2) serving a fake decoupled `bunny`.

Enough of the protocol for client tests without tritonserver: ServerLive, ModelReady, ModelConfig and
ModelStreamInfer. The fake model answers "caption <n>" words for an image (n = the image's byte count mod
1000), or "answer", then the prompt's first three words, one response per word when streaming; an image PIL
cannot open gets a Triton-style error response. The prompt is `text_input` or the last message of `messages`.
It keeps the images and the gRPC metadata each request came with, and answers a text "FAIL:<message>" with the
error <message>, as the real server would send it.

For the OpenAI front's tests it also: puts "s<seed>" after the first word when a seed is given; with `logprobs`
k > 0, returns the logprob outputs (see fake_logprobs); with `rest_of_context` and no `max_tokens`, answers up to
FAKE_CONTEXT tokens; answers seed 666 with an error after its first word; keeps a request whose prompt holds
"hang" open after its first word until the client cancels it. `seen` records every request's inputs;
`cancelled` counts the requests a client ended before their final response.
"""
from __future__ import annotations

import io
import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from bunny_client.perf_analyzer import serialize_bytes


INPUTS = [("text_input", "BYTES", [1]), ("image", "BYTES", [-1]), ("max_tokens", "INT32", [1]),
          ("temperature", "FP32", [1]), ("top_p", "FP32", [1]), ("top_k", "INT32", [1]),
          ("repetition_penalty", "FP32", [1]), ("seed", "UINT64", [1]), ("stop", "BYTES", [-1]),
          ("ignore_eos", "BOOL", [1]), ("stream", "BOOL", [1]), ("apply_chat_template", "BOOL", [1]),
          ("messages", "BYTES", [1]), ("logprobs", "INT32", [1]), ("presence_penalty", "FP32", [1]),
          ("frequency_penalty", "FP32", [1]), ("min_tokens", "INT32", [1]), ("rest_of_context", "BOOL", [1])]
OUTPUTS = [("text_output", "BYTES", [1]), ("output_ids", "INT32", [-1]), ("finish_reason", "BYTES", [1]),
           ("prompt_tokens", "INT32", [1]), ("completion_tokens", "INT32", [1]), ("output_logprobs", "FP32", [-1]),
           ("output_token_bytes", "BYTES", [-1]), ("top_logprob_ids", "INT32", [-1, -1]),
           ("top_logprobs", "FP32", [-1, -1]), ("top_token_bytes", "BYTES", [-1, -1])]
FAKE_CONTEXT = 40
FAILING_SEED = 666


def fake_logprobs(token_id: int, piece: str, k: int) -> tuple[float, bytes, list[tuple[int, float, bytes]]]:
    """The fake's logprob outputs of one token: its logprob, bytes, and k alternatives (itself first). Multiples of
    1/8, exact in float32."""
    logprob = -token_id / 8
    return logprob, piece.encode(), [(token_id, logprob, piece.encode())] + [
        (100 * r + token_id, logprob - r, f"alt{r}".encode()) for r in range(1, k)]


def fake_answer(text: str, image: bytes | None, max_tokens: int, ignore_eos: bool, seed: int | None = None) -> list[str]:
    words = [f"caption {len(image) % 1000}" if image else "answer", *text.split()[:3]]
    if seed is not None:
        words.insert(1, f"s{seed}")
    words = [w for piece in words for w in piece.split()]
    if ignore_eos:
        words = [words[i % len(words)] for i in range(max_tokens)]
    return [("" if i == 0 else " ") + w for i, w in enumerate(words[:max_tokens])]


class FakeBunny(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, token_delay_s: float = 0.0, parameters: dict[str, str] | None = None):
        self.token_delay_s = token_delay_s
        self.parameters = parameters or {}   # the model config's parameters (string values)
        self.requests = 0
        self.seen: list[dict[str, np.ndarray]] = []
        self.cancelled = 0
        self.images: list[list[bytes]] = []       # each request's images, in order
        self.metadata: list[dict[str, str]] = []  # each call's gRPC metadata
        self.config_reads = 0
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self.hanging = threading.Event()   # a "hang" request has answered its first word

    def _seen(self, context) -> None:
        with self._lock:
            self.metadata.append(dict(context.invocation_metadata()))

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):
        self._seen(context)
        return service_pb2.ModelReadyResponse(ready=request.name == "bunny")

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name="fake-triton", version="2.51.0")

    def ModelMetadata(self, request, context):
        meta = service_pb2.ModelMetadataResponse(name="bunny", versions=["1"], platform="python")
        for name, dtype, dims in INPUTS:
            meta.inputs.add(name=name, datatype=dtype, shape=dims)
        for name, dtype, dims in OUTPUTS:
            meta.outputs.add(name=name, datatype=dtype, shape=dims)
        return meta

    def ModelConfig(self, request, context):
        self._seen(context)
        with self._lock:
            self.config_reads += 1
        config = model_config_pb2.ModelConfig(name="bunny", max_batch_size=0, backend="python")
        for key, value in self.parameters.items():
            config.parameters[key].string_value = value
        config.model_transaction_policy.decoupled = True
        for name, dtype, dims in INPUTS:
            config.input.add(name=name, data_type=model_config_pb2.DataType.Value("TYPE_" + dtype.replace("BYTES", "STRING")),
                             dims=dims, optional=name != "text_input")
        for name, dtype, dims in OUTPUTS:
            config.output.add(name=name, data_type=model_config_pb2.DataType.Value("TYPE_" + dtype.replace("BYTES", "STRING")),
                              dims=dims)
        return service_pb2.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):
        return service_pb2.ModelStatisticsResponse()

    @staticmethod
    def _inputs(request) -> dict[str, np.ndarray]:
        out = {}
        for spec, raw in zip(request.inputs, request.raw_input_contents):
            if spec.datatype == "BYTES":
                out[spec.name] = deserialize_bytes_tensor(raw)
            else:
                out[spec.name] = np.frombuffer(raw, dtype=triton_to_np_dtype(spec.datatype))
        return out

    @staticmethod
    def _response(request, text: str, ids: list[int], reason: str, prompt: int, done: int, final: bool,
                  logprobs: list | None = None):
        resp = service_pb2.ModelInferResponse(model_name="bunny", id=request.id)
        tensors = [
            ("text_output", "BYTES", serialize_bytes(text.encode()), [1]),
            ("output_ids", "INT32", np.array(ids, dtype=np.int32).tobytes(), [len(ids)]),
            ("finish_reason", "BYTES", serialize_bytes(reason.encode()), [1]),
            ("prompt_tokens", "INT32", np.array([prompt], dtype=np.int32).tobytes(), [1]),
            ("completion_tokens", "INT32", np.array([done], dtype=np.int32).tobytes(), [1]),
        ]
        if logprobs is not None:   # one (logprob, bytes, top) per id
            k = len(logprobs[0][2]) if logprobs else 0
            tops = [t for _, _, top in logprobs for t in top]
            tensors += [
                ("output_logprobs", "FP32", np.array([x[0] for x in logprobs], dtype=np.float32).tobytes(), [len(ids)]),
                ("output_token_bytes", "BYTES", serialize_bytes(*(x[1] for x in logprobs)), [len(ids)]),
                ("top_logprob_ids", "INT32", np.array([t[0] for t in tops], dtype=np.int32).tobytes(), [len(ids), k]),
                ("top_logprobs", "FP32", np.array([t[1] for t in tops], dtype=np.float32).tobytes(), [len(ids), k]),
                ("top_token_bytes", "BYTES", serialize_bytes(*(t[2] for t in tops)), [len(ids), k]),
            ]
        for name, dtype, raw, shape in tensors:
            resp.outputs.add(name=name, datatype=dtype, shape=shape)
            resp.raw_output_contents.append(raw)
        resp.parameters["triton_final_response"].bool_param = final
        return service_pb2.ModelStreamInferResponse(infer_response=resp)

    @staticmethod
    def _error(request, message: str):
        return service_pb2.ModelStreamInferResponse(
            error_message=message, infer_response=service_pb2.ModelInferResponse(model_name="bunny", id=request.id))

    def _answer(self, request, rpc_ended: threading.Event):
        x = self._inputs(request)
        with self._lock:
            self.requests += 1
            self.seen.append(x)
            self._ended.notify_all()
        templated = bool(x["apply_chat_template"][0]) if "apply_chat_template" in x else True
        if "messages" in x:
            text = json.loads(x["messages"][0])[-1]["content"]
        else:
            text = x["text_input"][0].decode()
        images = [bytes(i) for i in x["image"]] if "image" in x else []
        with self._lock:
            self.images.append(images)
        if text.startswith("FAIL:"):
            yield self._error(request, text[len("FAIL:"):])
            return
        image = images[0] if images else None
        if image is not None:
            try:
                Image.open(io.BytesIO(image)).verify()
            except Exception:
                yield self._error(request, "image 0 is not a readable image file")
                return
        prompt = (10 if templated else 0) + len(text.split())
        if "max_tokens" in x:
            max_tokens = int(x["max_tokens"][0])
        else:
            max_tokens = FAKE_CONTEXT - prompt if "rest_of_context" in x and x["rest_of_context"][0] else 256
        ignore_eos = bool(x["ignore_eos"][0]) if "ignore_eos" in x else False
        stream = bool(x["stream"][0]) if "stream" in x else False
        seed = int(x["seed"][0]) if "seed" in x else None
        k = int(x["logprobs"][0]) if "logprobs" in x else 0
        pieces = fake_answer(text, image, max_tokens, ignore_eos, seed)
        reason = "length" if len(pieces) >= max_tokens else "stop"
        logprobs = [fake_logprobs(i + 1, piece, k) for i, piece in enumerate(pieces)] if k > 0 else None
        if not stream and seed != FAILING_SEED and "hang" not in text:
            ids = list(range(1, len(pieces) + 1))
            yield self._response(request, "".join(pieces), ids, reason, prompt, len(pieces), True, logprobs)
            return
        for i, piece in enumerate(pieces):
            time.sleep(self.token_delay_s)
            yield self._response(request, piece, [i + 1], "", prompt, i + 1, False,
                                 None if logprobs is None else logprobs[i:i + 1])
            if seed == FAILING_SEED:
                if "hang" in text:   # fail once a hanging neighbour has answered its first word
                    assert self.hanging.wait(10), "no hanging request answered"
                yield self._error(request, f"[internal] engine error: RuntimeError: seed {FAILING_SEED} fails")
                return
            if "hang" in text:
                self.hanging.set()
                rpc_ended.wait()
                return
        yield self._response(request, "", [], reason, prompt, len(pieces), True, [] if k > 0 else None)

    def ModelStreamInfer(self, request_iterator, context):
        self._seen(context)
        rpc_ended, answered = threading.Event(), threading.Event()

        def on_end():
            rpc_ended.set()
            if not answered.is_set():
                with self._lock:
                    self.cancelled += 1
                    self._ended.notify_all()

        context.add_callback(on_end)
        for request in request_iterator:  # one at a time: the client sends one request per stream at a time
            for response in self._answer(request, rpc_ended):
                yield response
                if response.error_message or response.infer_response.parameters["triton_final_response"].bool_param:
                    answered.set()

    def wait_for_seen(self, n: int, timeout: float = 10.0) -> None:
        """Until `n` requests in all have arrived."""
        with self._ended:
            assert self._ended.wait_for(lambda: len(self.seen) >= n, timeout), f"{len(self.seen)} requests, not {n}"

    def wait_for_cancelled(self, n: int, timeout: float = 10.0) -> None:
        """Until `n` requests in all were cancelled by their client (no sleep: woken as each ends)."""
        with self._ended:
            assert self._ended.wait_for(lambda: self.cancelled >= n, timeout), f"{self.cancelled} cancelled, not {n}"


class FakeServer:
    """Start on 127.0.0.1 (a free port unless `port` is given; TLS with `credentials`, grpc.ssl_server_credentials);
    `url` is host:port; `stop()` ends it."""

    def __init__(self, token_delay_s: float = 0.0, parameters: dict[str, str] | None = None, port: int = 0,
                 credentials=None):
        self.servicer = FakeBunny(token_delay_s, parameters)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        self.url = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
