"""A response of the Triton model `bunny` read straight from its raw contents, as Triton's gRPC frontend sends
every output (docs/api/triton-model.md). Shared by the gRPC client and the OpenAI front: it runs once per response,
and tritonclient's InferResult.as_numpy per output costs ~3x the CPU. numpy only, no torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class WireResponse:
    text: str
    ids: list[int]
    finish_reason: str              # empty before the final response
    prompt_tokens: int | None       # None when the response does not carry it
    completion_tokens: int | None
    final: bool


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw contents (each a 4-byte little-endian length, then the bytes)."""
    out, i = [], 0
    while i + 4 <= len(raw):
        n = int.from_bytes(raw[i:i + 4], "little")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def raw_outputs(response) -> dict[str, bytes]:
    """A ModelInferResponse's outputs by name, each its raw contents."""
    return dict(zip((o.name for o in response.outputs), response.raw_output_contents))


def read_response(response) -> WireResponse:
    """A ModelInferResponse (tritonclient's `InferResult.get_response()`), an empty flags-only final included."""
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    raw = raw_outputs(response)
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
    )


@dataclass(slots=True)
class TokenLogprob:
    """One generated token with logprobs: its id, logprob and bytes, and the k most likely (id, logprob, bytes)."""
    id: int
    logprob: float
    bytes: bytes
    top: list[tuple[int, float, bytes]]


def read_logprobs(raw: dict[str, bytes]) -> list[TokenLogprob] | None:
    """The logprob outputs of a response (raw contents by name, see raw_outputs), one entry per id of output_ids;
    None when the response carries none (the request did not ask for logprobs)."""
    if "output_logprobs" not in raw:
        return None
    ids = np.frombuffer(raw.get("output_ids", b""), dtype="<i4").tolist()
    logprobs = np.frombuffer(raw["output_logprobs"], dtype="<f4").tolist()
    token_bytes = bytes_elements(raw.get("output_token_bytes", b""))
    top_ids = np.frombuffer(raw.get("top_logprob_ids", b""), dtype="<i4").tolist()
    top_logprobs = np.frombuffer(raw.get("top_logprobs", b""), dtype="<f4").tolist()
    top_bytes = bytes_elements(raw.get("top_token_bytes", b""))
    n = len(ids)
    if not (len(logprobs) == len(token_bytes) == n and len(top_ids) == len(top_logprobs) == len(top_bytes)
            and (n == 0 or len(top_ids) % n == 0)):
        raise ValueError(f"the logprob outputs do not fit {n} output ids: {len(logprobs)} logprobs, "
                         f"{len(token_bytes)} token bytes, {len(top_ids)} top ids, {len(top_logprobs)} top logprobs, "
                         f"{len(top_bytes)} top bytes")
    k = len(top_ids) // n if n else 0
    return [TokenLogprob(ids[i], logprobs[i], token_bytes[i],
                         [(top_ids[j], top_logprobs[j], top_bytes[j]) for j in range(i * k, (i + 1) * k)])
            for i in range(n)]
