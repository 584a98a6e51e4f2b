"""The Triton model `bunny`'s tensors, in one place: names, types, dims, defaults and value ranges of the inputs,
the outputs, and the error codes the model puts in front of its error messages (docs/api/triton-model.md).

Used by the stub (stub/request_io.py), the engine's SamplingParams (the ranges), the gRPC client
(bunny_client/grpc_requests.py) and the OpenAI front (server/openai/translate.py); tests/test_wire_schema.py holds
config.pbtxt to it. numpy only, no torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# Triton datatype -> (numpy dtype sent by clients, numpy dtype kinds accepted by the model)
DATATYPES = {
    "BYTES": (np.object_, "OSU"),
    "INT32": (np.int32, "iu"),
    "UINT64": (np.uint64, "iu"),
    "FP32": (np.float32, "f"),
    "BOOL": (np.bool_, "b"),
}
INT32_RANGE = (-2**31, 2**31 - 1)
MAX_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class Range:
    """low/high bound a value (None: unbounded); open_low / open_high exclude the bound itself."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.open_high and value == self.high)))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{_num(self.low)}, {_num(self.high)}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {_num(self.low)}"
        return f"{'<' if self.open_high else '<='} {_num(self.high)}"


def _num(x) -> str:
    if x == 2**64:
        return "2^64"
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    dims: tuple[int, ...]
    default: object = None          # the value an absent scalar input takes (None: no value)
    range: Range | None = None      # the values a scalar input accepts

    @property
    def numpy_dtype(self):
        return DATATYPES[self.datatype][0]

    @property
    def scalar(self) -> bool:
        return self.dims == (1,) and self.datatype != "BYTES"


INPUTS = (
    Tensor("text_input", "BYTES", (1,)),
    Tensor("messages", "BYTES", (1,)),
    Tensor("image", "BYTES", (-1,)),
    Tensor("max_tokens", "INT32", (1,), 256, Range(1)),
    Tensor("temperature", "FP32", (1,), 0.0, Range(0.0)),
    Tensor("top_p", "FP32", (1,), 1.0, Range(0.0, 1.0, open_low=True)),
    Tensor("top_k", "INT32", (1,), 0, Range(0)),
    Tensor("repetition_penalty", "FP32", (1,), 1.0, Range(0.0, open_low=True)),
    Tensor("seed", "UINT64", (1,), None, Range(0, 2**64, open_high=True)),
    Tensor("stop", "BYTES", (-1,)),
    Tensor("ignore_eos", "BOOL", (1,), False),
    Tensor("stream", "BOOL", (1,), False),
    Tensor("apply_chat_template", "BOOL", (1,), True),
    Tensor("logprobs", "INT32", (1,), 0, Range(0, MAX_LOGPROBS)),
    Tensor("presence_penalty", "FP32", (1,), 0.0, Range(-2.0, 2.0)),
    Tensor("frequency_penalty", "FP32", (1,), 0.0, Range(-2.0, 2.0)),
    Tensor("min_tokens", "INT32", (1,), 0, Range(0)),
    Tensor("response_format", "BYTES", (1,)),
    # max_tokens absent: the rest of the context instead of 256 (the OpenAI front's default)
    Tensor("rest_of_context", "BOOL", (1,), False),
)

OUTPUTS = (
    Tensor("text_output", "BYTES", (1,)),
    Tensor("output_ids", "INT32", (-1,)),
    Tensor("finish_reason", "BYTES", (1,)),
    Tensor("prompt_tokens", "INT32", (1,)),
    Tensor("completion_tokens", "INT32", (1,)),
    # with logprobs k > 0, for each id of output_ids: its logprob and bytes, and the k most likely tokens
    Tensor("output_logprobs", "FP32", (-1,)),
    Tensor("output_token_bytes", "BYTES", (-1,)),
    Tensor("top_logprob_ids", "INT32", (-1, -1)),
    Tensor("top_logprobs", "FP32", (-1, -1)),
    Tensor("top_token_bytes", "BYTES", (-1, -1)),
)

INPUT = {t.name: t for t in INPUTS}
OUTPUT = {t.name: t for t in OUTPUTS}
SCALAR_INPUTS = tuple(t.name for t in INPUTS if t.scalar)


def range_problem(name: str, value) -> str | None:
    """Why `value` is not accepted for the scalar input `name`, or None (one definition of each range)."""
    bounds = INPUT[name].range
    if bounds is None or bounds.holds(value):
        return None
    return f"{name} must be {bounds.describe()}, got {value}"


# ---- errors ----------------------------------------------------------------------------------------------------
# Triton 2.51 hands a decoupled model's errors to gRPC stream clients without their status code, so the model puts
# one of these codes in front of its message: "[invalid_argument] max_tokens must be >= 1, got 0".
ERROR_CODES = {"invalid_argument": 400, "unavailable": 503, "internal": 500}


def tag_error(code: str, message: str) -> str:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return f"[{code}] {message}"


def read_error(message: str) -> tuple[str | None, str]:
    """(code, the message from its tag on) of a model error, wherever a client library put the tag; code None
    when the message carries none (an error from Triton itself, or from an older model)."""
    text = " ".join((message or "").split())
    found = _TAG.search(text)
    if found is None:
        return None, text
    return found.group(1), text[found.end():]


_TAG = re.compile(r"\[(" + "|".join(ERROR_CODES) + r")\] ")
