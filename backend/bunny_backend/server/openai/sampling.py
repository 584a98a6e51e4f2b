"""The sampling fields chat and completions share -> the Triton model's scalar inputs; the number of choices; the
`logprobs` input. One home for how OpenAI's and vLLM's fields map onto the model's inputs
(docs/api/triton-model.md); the model checks the values again.
"""
from __future__ import annotations

import numpy as np

from bunny_backend.io import wire_schema

from .errors import bad_request
from .protocol import SamplingFields

MAX_CHOICES = 128   # n, and for completions prompts x n: each choice is one Triton request
INT32_MIN, INT32_MAX = wire_schema.INT32_RANGE


def choices_per_prompt(request: SamplingFields) -> int:
    n = 1 if request.n is None else request.n
    if not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    return n


def logprobs_input(alternatives: int | None, field: str) -> int:
    """The model's `logprobs` input for a request that wants `alternatives` most likely tokens per position (None:
    no logprobs at all). The model returns the chosen token's logprob only with k >= 1, so 0 alternatives asks for
    1 and the answer leaves it out."""
    if alternatives is None:
        return 0
    bounds = wire_schema.INPUT["logprobs"].range
    if not bounds.holds(alternatives):
        raise bad_request(f"{field} must be {bounds.describe()}, got {alternatives}", param=field)
    return max(alternatives, 1)


def sampling_inputs(request: SamplingFields, max_tokens: int | None, logprobs: int) -> dict[str, np.ndarray]:
    """The scalar inputs of every choice of `request` (the seed is the first choice's). `max_tokens` None: the rest
    of the context (OpenAI's default); `logprobs` is the model's input (0: off)."""
    values = {"max_tokens": max_tokens, "temperature": request.temperature, "top_p": request.top_p,
              "seed": request.seed, "top_k": 0 if request.top_k == -1 else request.top_k,
              "repetition_penalty": request.repetition_penalty, "ignore_eos": request.ignore_eos,
              "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
              "min_tokens": request.min_tokens, "logprobs": logprobs or None,
              "rest_of_context": True if max_tokens is None else None}
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        spec = wire_schema.INPUT[name]
        problem = wire_schema.range_problem(name, value)
        if problem is None and spec.datatype == "INT32" and not INT32_MIN <= value <= INT32_MAX:
            problem = f"{name} is out of range: {value}"
        if problem:
            raise bad_request(problem, param=name)
        out[name] = np.array([value], dtype=spec.numpy_dtype)
    return out
