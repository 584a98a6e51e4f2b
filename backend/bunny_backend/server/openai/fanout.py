"""The choices of one HTTP request, each its own Triton request, run at once; their responses merged in arrival order.

Choice `prompt * n + i` is the i-th choice of a prompt (OpenAI's and vLLM's order). With a seed s, choice i of each
prompt samples with seed s + i (mod 2^64), so a seeded request gives the same n choices again; without one, each
choice gets its own seed from the engine. The model's prefix cache shares the prompt between the choices.

Any choice's error ends the whole answer: closing the fan-out cancels the Triton requests still running, as does a
client that goes away (the caller closes it).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from .translate import TritonRequest
from .triton_client import TritonResponse

SEED_SPACE = 2**64


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    prompt: int
    inputs: dict[str, np.ndarray]


def plan_choices(prepared: TritonRequest) -> list[Choice]:
    seed = prepared.inputs.get("seed")
    out = []
    for p, own in enumerate(prepared.prompts):
        for i in range(prepared.n):
            inputs = {**prepared.inputs, **own}
            if seed is not None:
                inputs["seed"] = np.array([(int(seed[0]) + i) % SEED_SPACE], dtype=np.uint64)
            out.append(Choice(p * prepared.n + i, p, inputs))
    return out


class Fanout:
    """Iterate for (choice index, response) until every choice had its final response; raises the first error of
    any choice. Create it in the event loop; always `aclose()` it."""

    def __init__(self, triton, choices: list[Choice], request_id: str):
        self.choices = choices
        self.prompt_of = {c.index: c.prompt for c in choices}
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=max(16, 2 * len(choices)))
        self._running = len(choices)
        self._tasks = [asyncio.ensure_future(self._pump(triton, c, f"{request_id}-{c.index}")) for c in choices]

    async def _pump(self, triton, choice: Choice, request_id: str) -> None:
        answer: AsyncIterator[TritonResponse] = triton.generate(choice.inputs, request_id=request_id)
        try:
            async for response in answer:
                await self._queue.put((choice.index, response, None))
        except Exception as e:   # noqa: BLE001 - handed to the reader, who raises it
            await self._queue.put((choice.index, None, e))
        finally:
            await answer.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, TritonResponse]:
        if self._running == 0:
            raise StopAsyncIteration
        index, response, error = await self._queue.get()
        if error is not None:
            raise error
        if response.final:
            self._running -= 1
        return index, response

    async def until_each_started(self) -> list[tuple[int, TritonResponse]]:
        """The responses that arrive until every choice has had one (so a request the model refuses is refused
        before a stream starts)."""
        seen, out = set(), []
        while len(seen) < len(self.choices):
            index, response = await self.__anext__()
            seen.add(index)
            out.append((index, response))
        return out

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
