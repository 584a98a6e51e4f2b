"""What the engine hands back to its caller, one object per request per step that produced something."""
from __future__ import annotations

from dataclasses import dataclass, field


class BadRequestError(ValueError):
    """A request the engine refuses; the message says what is wrong and is safe to show the client."""


class ServerBusyError(BadRequestError):
    """The request is fine but too many are already waiting (max_queued_requests); the client may retry."""


class EngineDeadError(RuntimeError):
    """The engine can run no more steps (a tensor-parallel rank died, or the ranks fell out of step); every
    request in flight fails, and the model must be restarted. The message says why."""


@dataclass(slots=True)
class TokenLogprobs:
    """One generated token's raw logprob (log-softmax of the model's logits, before any penalty or temperature)
    and the request's `logprobs` most likely tokens at that position, most likely first."""
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None     # "stop" | "length" | "cancelled" | "error" on the final output
    error: str | None = None             # set with finish_reason "error"
    prompt_tokens: int = 0               # image feature rows counted
    completion_tokens: int = 0           # generated so far
    ttft_s: float | None = None          # set on the output that carries the first token
    inter_token_latencies_s: list[float] = field(default_factory=list)  # for tokens after the first
    logprobs: list[TokenLogprobs] | None = None   # one per delta_token_ids when the request asked for logprobs


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_query_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions: int = 0
    encoder_images_total: int = 0           # images run through the vision tower
    encoder_seconds_total: float = 0.0      # wall time of those vision-tower calls
    encoder_cache_hits: int = 0             # images whose features came from the encoder cache
    encoder_cache_misses: int = 0
    encoder_cache_bytes: int = 0            # features held by the encoder cache now
    requests_finished: dict = field(default_factory=dict)   # finish_reason -> count
