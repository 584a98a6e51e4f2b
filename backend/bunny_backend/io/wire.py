"""A response of the Triton model `bunny` read straight from its raw contents, as Triton's gRPC frontend sends
every output (docs/api/triton-model.md). Shared by the gRPC client and the OpenAI front: it runs once per response,
and tritonclient's InferResult.as_numpy per output costs ~3x the CPU. numpy only, no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class TopLogprob(NamedTuple):
    id: int
    logprob: float
    bytes: bytes


@dataclass(slots=True)
class TokenLogprob:
    """One token of `ids`: its raw logprob and bytes, and the most likely tokens at its position, best first."""
    id: int
    logprob: float
    bytes: bytes
    top: list[TopLogprob]


@dataclass(slots=True)
class WireResponse:
    text: str
    ids: list[int]
    finish_reason: str              # empty before the final response
    prompt_tokens: int | None       # None when the response does not carry it
    completion_tokens: int | None
    final: bool
    logprobs: list[TokenLogprob] | None = None   # one per id; None when the response carries no logprobs


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw contents (each a 4-byte little-endian length, then the bytes)."""
    out, i = [], 0
    while i + 4 <= len(raw):
        n = int.from_bytes(raw[i:i + 4], "little")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def read_response(response) -> WireResponse:
    """A ModelInferResponse (tritonclient's `InferResult.get_response()`), an empty flags-only final included."""
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents))
    shapes = {o.name: list(o.shape) for o in response.outputs}
    ints = {name: np.frombuffer(raw[name], dtype="<i4") for name in ("output_ids", "prompt_tokens", "completion_tokens")
            if name in raw}
    reason = bytes_elements(raw.get("finish_reason", b""))
    prompt, completion = ints.get("prompt_tokens"), ints.get("completion_tokens")
    return WireResponse(
        text="".join(x.decode("utf-8", "replace") for x in bytes_elements(raw.get("text_output", b""))),
        ids=ints["output_ids"].tolist() if "output_ids" in ints else [],
        finish_reason=reason[0].decode() if reason else "",
        prompt_tokens=int(prompt[0]) if prompt is not None and prompt.size else None,
        completion_tokens=int(completion[0]) if completion is not None and completion.size else None,
        final=bool(final),
        logprobs=_logprobs(raw, shapes, ints["output_ids"].tolist() if "output_ids" in ints else []),
    )


_TOP_OUTPUTS = ("top_logprob_ids", "top_logprobs", "top_token_bytes")


def _logprobs(raw: dict, shapes: dict, ids: list[int]) -> list[TokenLogprob] | None:
    """The logprob outputs, one record per id; None when the response has no output_logprobs. An output the
    client did not ask for reads as NaN logprobs, empty bytes or id -1."""
    if "output_logprobs" not in raw:
        return None
    n = len(ids)
    k = next((shapes[name][1] for name in _TOP_OUTPUTS if name in shapes), 0)

    def values(name: str, count: int, default) -> list:
        if name not in raw:
            return [default] * count
        out = bytes_elements(raw[name]) if name.endswith("bytes") else \
            np.frombuffer(raw[name], dtype="<i4" if name.endswith("ids") else "<f4").tolist()
        if len(out) != count:
            raise ValueError(f"{name} holds {len(out)} values for {n} output ids")
        return out

    logprobs, token_bytes = values("output_logprobs", n, None), values("output_token_bytes", n, b"")
    top_ids, top_logprobs = values("top_logprob_ids", n * k, -1), values("top_logprobs", n * k, float("nan"))
    top_bytes = values("top_token_bytes", n * k, b"")
    return [TokenLogprob(ids[j], logprobs[j], token_bytes[j],
                         [TopLogprob(top_ids[i], top_logprobs[i], top_bytes[i]) for i in range(j * k, (j + 1) * k)])
            for j in range(n)]
