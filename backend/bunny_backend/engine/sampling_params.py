"""Per-request sampling parameters, validated on construction (docs/api/triton-model.md defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from bunny_backend.io.wire_schema import range_problem

# Stop strings are matched after every token: bound the work one request can add to each step.
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 1024


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = 256    # None: the rest of the context (RequestBuilder settles it)
    temperature: float = 0.0        # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None         # None: random
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0               # top alternatives returned with each token's logprob; 0: no logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0             # EOS and stop strings are ignored before this many new tokens
    response_format: str | None = None   # OpenAI's response_format JSON; None: free text

    def __post_init__(self) -> None:
        for name in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "logprobs",
                     "presence_penalty", "frequency_penalty", "min_tokens"):
            value = getattr(self, name)
            if value is not None and (problem := range_problem(name, value)):
                raise ValueError(problem)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(min_tokens_problem(self.min_tokens, self.max_tokens))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings given; at most {MAX_STOP_STRINGS}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def min_tokens_problem(min_tokens: int, max_tokens: int) -> str:
    return f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})"
