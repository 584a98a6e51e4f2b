"""`POST /v1/completions` (OpenAI's legacy completions) -> the Triton model's inputs. Each prompt is the model's
`text_input` as it is (`apply_chat_template` false); the sampling fields are chat's (sampling.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import bad_request
from .protocol import SamplingFields, parse_body
from .sampling import MAX_CHOICES, choices_per_prompt, logprobs_input, sampling_inputs
from .served_models import ServedModels
from .translate import TritonRequest, include_usage, response_format_inputs, stop_input

class CompletionRequest(SamplingFields):
    prompt: Any = None              # a string or a list of strings; checked in prompts() for a clear message
    logprobs: int | None = None     # the k most likely tokens at each position, plus the chosen one
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# field -> whether the value asks for something this server cannot do
REFUSED = {
    "logit_bias": lambda v: bool(v),
}


def prepare_completion(body: bytes, served: ServedModels, *_image_options) -> TritonRequest:
    """The whole translation of one HTTP body (prepare's signature: completions carry no images); OpenAIError
    naming the problem (404 for a model not served)."""
    request = parse_body(body, CompletionRequest, REFUSED)
    model = served.resolve(request.model)
    prepared = to_triton(request)
    prepared.model = model
    return prepared


def to_triton(request: CompletionRequest) -> TritonRequest:
    texts = prompts(request.prompt)
    n = choices_per_prompt(request)
    if len(texts) * n > MAX_CHOICES:
        raise bad_request(f"{len(texts)} prompts x n={n} is {len(texts) * n} choices; at most {MAX_CHOICES} are "
                          "allowed per request", param="n")
    if request.echo:
        raise bad_request("echo is not supported: the answer holds the completion only", param="echo")
    if request.suffix:
        raise bad_request("suffix is not supported (no fill-in-the-middle)", param="suffix")
    if request.best_of not in (None, n):
        raise bad_request(f"best_of must equal n ({n}) or be left out: this server returns every choice it makes",
                          param="best_of")
    inputs = {"apply_chat_template": np.array([False]), "stream": np.array([bool(request.stream)])}
    inputs.update(sampling_inputs(request, request.max_tokens, logprobs_input(request.logprobs, "logprobs")))
    inputs.update(stop_input(request))
    inputs.update(response_format_inputs(request))
    own = [{"text_input": np.array([t.encode("utf-8", "surrogatepass")], dtype=object)} for t in texts]
    return TritonRequest(inputs, bool(request.stream), include_usage(request), bool(request.return_token_ids),
                         n=n, top_logprobs=request.logprobs, prompts=own)


def prompts(prompt: Any) -> list[str]:
    """`prompt` as a list of texts; a clear 400 for token ids and anything else."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) and not isinstance(p, bool)
                                                   for p in prompt):
        raise bad_request("token-id prompts are not supported: send the prompt as a string or a list of strings",
                          param="prompt")
    if prompt is None or prompt == []:
        raise bad_request("prompt is required: a string or a list of strings", param="prompt")
    raise bad_request("prompt must be a string or a list of strings", param="prompt")
