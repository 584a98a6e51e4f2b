"""The requests of `POST /v1/chat/completions` (and the sampling fields `/v1/completions` shares, see
completions.py) as pydantic models, and the fields this server refuses or ignores.

Fields that would change the result and that Bunny behind Triton cannot honour are refused by name (400), so a
client never gets an answer to a different question than it asked; harmless ones are accepted and ignored.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import bad_request


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    """One part of a message's content: {"type": "text", "text"} or {"type": "image_url", "image_url": {"url"}}."""
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")   # tool_calls, audio, ...: refused by name in translate
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None   # no obfuscation padding is sent; accepted for the SDK's sake


class SamplingFields(BaseModel):
    """The fields chat and (legacy) completions share: how to sample, how many choices, how to answer."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None   # absent: the first served name (vLLM)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions under vLLM's names, for clients that pass them in extra_body.
    top_k: int | None = None                 # -1 is off, as in vLLM
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    return_token_ids: bool | None = False   # each choice (and chunk) also carries the new token ids
    # Structured output (structured_output.py): OpenAI's response_format, or one of vLLM's guided_* extensions.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _set(value) -> bool:
    return value not in (None, False, 0, "", [], {})


# field -> whether the value asks for something this server cannot do
REFUSED = {
    "tools": _set,
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": _set,
    "function_call": lambda v: v not in (None, "none"),
    "logit_bias": _set,
    "audio": _set,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": _set,
    "web_search_options": _set,
    "moderation": _set,
}
# accepted and ignored: they change nothing in the answer
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention"}


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The JSON body of a chat request -> the request; OpenAIError(400) naming bad, unsupported or unknown fields."""
    return parse_body(body, ChatCompletionRequest, REFUSED)


def parse_body(body: bytes, kind: type[SamplingFields], refused_fields: dict) -> SamplingFields:
    """The JSON body -> a request of `kind`; OpenAIError(400) naming bad fields, the `refused_fields` whose check
    says they ask for what this server cannot do, and unknown fields."""
    try:
        request = kind.model_validate_json(body)
    except ValidationError as e:
        raise bad_request("invalid request: " + "; ".join(_describe(err) for err in e.errors()[:5])) from None
    extra: dict[str, Any] = request.model_extra or {}
    refused = sorted(k for k, check in refused_fields.items() if k in extra and check(extra[k]))
    if refused:
        raise bad_request(f"unsupported field(s) {refused}: this server answers in plain text, without tools "
                          "or logit biases", param=refused[0])
    unknown = sorted(k for k in extra if k not in refused_fields and k not in IGNORED)
    if unknown:
        raise bad_request(f"unknown field(s) {unknown}", param=unknown[0])
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    return request


def _describe(err: dict) -> str:
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err['msg']}" if loc else err["msg"]
