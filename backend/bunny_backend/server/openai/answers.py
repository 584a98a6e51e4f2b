"""One answer from the responses of its choices (fanout.py), whole or as server-sent events, in a shape: chat's
(responses.ChatShape) or the legacy completions' (completion_responses.TextCompletionShape).

Usage counts each prompt's tokens once, however many choices it has (as vLLM does), and sums the choices' new
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bunny_backend.io.wire import TokenLogprob

from .errors import OpenAIError
from .fanout import Fanout
from .responses import DONE, Completion, event, finish_reason, usage
from .triton_client import TritonResponse


@dataclass(slots=True)
class _Choice:
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    final: TritonResponse | None = None


class _Usage:
    def __init__(self, fan: Fanout):
        self.prompt_of = fan.prompt_of
        self.prompts: dict[int, int] = {}
        self.completion = 0

    def add(self, index: int, final: TritonResponse) -> None:
        self.prompts.setdefault(self.prompt_of[index], final.prompt_tokens)
        self.completion += final.completion_tokens

    def body(self) -> dict:
        return usage(sum(self.prompts.values()), self.completion)


async def whole(c: Completion, shape, fan: Fanout) -> dict:
    choices = {choice.index: _Choice() for choice in fan.choices}
    async for index, response in fan:
        choice = choices[index]
        choice.texts.append(response.text)
        choice.ids += response.ids
        choice.tokens += response.logprobs or []
        if response.final:
            choice.final = response
    tally = _Usage(fan)
    out = []
    for index, choice in sorted(choices.items()):
        tally.add(index, choice.final)
        out.append(shape.whole(index, "".join(choice.texts), choice.ids, choice.tokens, finish_reason(choice.final)))
    return {"id": c.id, "object": shape.object, "created": c.created, "model": c.model, "choices": out,
            "usage": tally.body()}


async def events(c: Completion, shape, fan: Fanout, started: list[tuple[int, TritonResponse]], include_usage: bool):
    """Server-sent events: each choice's opening chunk (chat's role), its pieces as they come (choices interleaved),
    a finish chunk per choice, usage when asked, [DONE]. `started`: the responses already read off the fan-out."""
    def chunk(choice: dict) -> str:
        body = {"id": c.id, "object": shape.chunk_object, "created": c.created, "model": c.model, "choices": [choice]}
        if include_usage:   # stream_options.include_usage: null on every chunk but the last
            body["usage"] = None
        return event(body)

    tally = _Usage(fan)
    try:
        for choice in fan.choices:
            opening = shape.opening(choice.index)
            if opening is not None:
                yield chunk(opening)
        async for index, response in _chain(started, fan):
            piece = shape.piece(index, response)
            if piece is not None:
                yield chunk(piece)
            if response.final:
                tally.add(index, response)
                yield chunk(shape.finish(index, finish_reason(response)))
        if include_usage:
            yield event({"id": c.id, "object": shape.chunk_object, "created": c.created, "model": c.model,
                         "choices": [], "usage": tally.body()})
        yield DONE
    except OpenAIError as e:   # mid-stream: the status line is long gone, so the error is an event
        yield event(e.body())
        yield DONE
    finally:
        await fan.aclose()


async def _chain(first: list, rest):
    for item in first:
        yield item
    async for item in rest:
        yield item
