"""Raw gRPC requests to the model `bunny` for the system tests: any tensors, one stream per request."""
from __future__ import annotations

import queue
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

TEXTS = ["Describe the image.", "What is a rabbit?", "请描述这张图片。", "Tell me a story about the sea.",
         "图中有什么？", "How many cats are there?", "What colour is the sky?", "Write a poem."]
SCALAR_DTYPES = {"max_tokens": np.int32, "temperature": np.float32, "top_p": np.float32, "top_k": np.int32,
                 "repetition_penalty": np.float32, "seed": np.uint64, "ignore_eos": np.bool_,
                 "apply_chat_template": np.bool_}


def inputs_of(text=None, images=(), stream=False, stop=(), **scalars) -> dict[str, np.ndarray]:
    out = {"stream": np.array([stream])}
    if stop:
        out["stop"] = np.array([s.encode() for s in stop], dtype=object)
    if text is not None:
        out["text_input"] = np.array([text.encode() if isinstance(text, str) else text], dtype=object)
    if images:
        out["image"] = np.array(list(images), dtype=object)
    out.update({k: np.array([v], dtype=SCALAR_DTYPES[k]) for k, v in scalars.items()})
    return out


def _response(result, final: bool) -> dict:
    r = {"final": final}
    if result.as_numpy("text_output") is not None:
        r.update(text=result.as_numpy("text_output")[0].decode(), ids=result.as_numpy("output_ids").tolist(),
                 reason=result.as_numpy("finish_reason")[0].decode(),
                 prompt=int(result.as_numpy("prompt_tokens")[0]),
                 completion=int(result.as_numpy("completion_tokens")[0]))
    return r


def send_raw(url: str, inputs: dict[str, np.ndarray], timeout: float = 120.0, cancel_after: int | None = None,
             cancel_after_s: float | None = None, cancel_event=None, on_response=None):
    """One request on its own stream -> (responses as dicts, the error or None; a str when the test stopped it).

    cancel_after: cancel once that many responses came; cancel_after_s: cancel when that long passes with no
    final response (at any moment: queued, in prefill, mid-stream); cancel_event (a threading.Event): cancel once
    it is set and no final response came. on_response(dict) is called for each response as it comes.
    Raises queue.Empty when no response came within `timeout` (a hang). The stream is cancelled only while
    the request is unfinished: with Triton 2.51, cancelling a gRPC stream whose request has already completed
    can leave the model referenced, and the server's shutdown then hangs until --exit-timeout-secs."""
    client = grpcclient.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        tensors.append(t)
    responses, finished = [], False
    try:
        client.async_stream_infer("bunny", tensors, enable_empty_final_response=True)
        deadline = None if cancel_after_s is None else time.monotonic() + cancel_after_s
        give_up = time.monotonic() + timeout
        while True:
            if cancel_event is not None:
                try:
                    result, error = q.get(timeout=0.01)
                except queue.Empty:
                    if cancel_event.is_set():
                        return responses, "cancelled by the test"
                    if time.monotonic() > give_up:
                        raise
                    continue
            elif deadline is not None:
                try:
                    result, error = q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    return responses, "cancelled by the test"
            else:
                result, error = q.get(timeout=timeout)
            if error is not None:
                finished = True
                return responses, error
            final = result.get_response().parameters["triton_final_response"].bool_param
            responses.append(_response(result, final))
            if on_response is not None:
                on_response(responses[-1])
            if final:
                finished = True
                return responses, None
            if cancel_after is not None and len(responses) >= cancel_after:
                return responses, "cancelled by the test"
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


def send(url: str, inputs: dict[str, np.ndarray], timeout: float = 120.0, cancel_after: int | None = None):
    """send_raw with the error as its message (str) or None."""
    responses, error = send_raw(url, inputs, timeout, cancel_after)
    return responses, None if error is None else str(error)


# Triton 2.51 sends a decoupled model's error as a message without its status code, so errors are told apart
# by what they say; anything else is a refused input (the model names the input and the problem).
_KINDS = (("busy", "server busy"), ("engine_error", "engine error"), ("internal", "internal error"),
          ("stub_dead", "Stub process"), ("cancelled", "cancelled"), ("unreachable", "failed to connect"))


def error_kind(error) -> str:
    if error is None:
        return "ok"
    message = error.message() if hasattr(error, "message") else str(error)
    return next((kind for kind, needle in _KINDS if needle in (message or "")), "invalid_input")


def joined(responses) -> tuple[str, list[int]]:
    return "".join(r["text"] for r in responses), sum((r["ids"] for r in responses), [])
