"""Rank 0 -> tensor-parallel workers: one step's inputs, without pickling anything per step.

The token ids, positions, logit rows and the attention context (ForwardContext: its integer tensors, lists and
flags, field by field; a mixed step's two sub-contexts likewise, nested) are packed into int64 words, written as
raw bytes into each worker's pipe (the pipe that also carried its startup messages). Image features (floats on
the device) follow as one broadcast per step that carries image rows. A pipe, unlike a lock or event in shared memory, cannot be left locked by a
process that is killed, and writing to a dead worker's pipe fails at once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from bunny_backend.utils.context import ForwardContext

STEP, EXIT = 1, 2
_NONE, _INT, _LIST, _TENSOR, _CONTEXT = 0, 1, 2, 3, 4
_DTYPES = [torch.int64, torch.int32, torch.bool]
_HEADER = 2   # command, number of words


@dataclass(slots=True)
class StepInputs:
    """What every rank needs to run one forward; logits are computed for `logit_rows` (rank 0 gets them)."""
    input_ids: torch.Tensor                 # int64 [N]
    positions: torch.Tensor                 # int64 [N]
    context: ForwardContext
    logit_rows: list[int]
    image_embeds: torch.Tensor | None = None   # [M, hidden], M = rows of input_ids equal to IMAGE_TOKEN_INDEX


def _encode_value(value, out: list) -> None:
    if value is None:
        out.append(np.array([_NONE], dtype=np.int64))
    elif isinstance(value, (bool, int)):
        out.append(np.array([_INT, int(value)], dtype=np.int64))
    elif isinstance(value, list):
        out.append(np.array([_LIST, len(value), *value], dtype=np.int64))
    elif isinstance(value, torch.Tensor) and value.dtype in _DTYPES:
        head = [_TENSOR, _DTYPES.index(value.dtype), value.dim(), *value.shape]
        out += [np.array(head, dtype=np.int64), value.detach().to("cpu", torch.int64).reshape(-1).numpy()]
    elif isinstance(value, ForwardContext):
        out.append(np.array([_CONTEXT], dtype=np.int64))
        for f in dataclasses.fields(ForwardContext):
            _encode_value(getattr(value, f.name), out)
    else:
        raise TypeError(f"cannot send a {type(value).__name__} to the tensor-parallel workers")


def encode(step: StepInputs) -> np.ndarray:
    parts: list[np.ndarray] = [np.zeros(_HEADER, dtype=np.int64)]
    num_images = 0 if step.image_embeds is None else step.image_embeds.shape[0]
    for value in (step.input_ids, step.positions, step.logit_rows, num_images, step.context):
        _encode_value(value, parts)
    words = np.concatenate(parts)
    words[0], words[1] = STEP, len(words)
    return words


class _Reader:
    def __init__(self, words: np.ndarray, device: torch.device):
        self.words, self.pos, self.device = words, _HEADER, device

    def _take(self, n: int) -> np.ndarray:
        out = self.words[self.pos:self.pos + n]
        self.pos += n
        return out

    def value(self):
        tag = int(self._take(1)[0])
        if tag == _NONE:
            return None
        if tag == _INT:
            return int(self._take(1)[0])
        if tag == _LIST:
            return self._take(int(self._take(1)[0])).tolist()
        if tag == _CONTEXT:
            ctx = ForwardContext()
            for f in dataclasses.fields(ForwardContext):
                value = self.value()
                setattr(ctx, f.name, bool(value) if isinstance(getattr(ctx, f.name), bool) else value)
            return ctx
        dtype, ndim = (int(x) for x in self._take(2))
        shape = [int(x) for x in self._take(ndim)]
        data = self._take(int(np.prod(shape, dtype=np.int64)))
        return torch.from_numpy(data.copy()).to(self.device, _DTYPES[dtype]).reshape(shape)


def decode(words: np.ndarray, device: torch.device) -> tuple[StepInputs, int]:
    """The step (its image_embeds still to be received) and its number of image rows."""
    r = _Reader(words, device)
    input_ids, positions, logit_rows, num_images, ctx = r.value(), r.value(), r.value(), r.value(), r.value()
    return StepInputs(input_ids, positions, ctx, logit_rows), num_images


class StepChannel:
    """Rank 0's ends of the workers' pipes (multiprocessing Connections)."""

    def __init__(self, conns: list):
        self.conns = conns

    def _post(self, words: np.ndarray) -> None:
        data = words.tobytes()
        for conn in self.conns:
            conn.send_bytes(data)

    def send(self, step: StepInputs) -> None:
        self._post(encode(step))

    def send_exit(self) -> None:
        self._post(np.array([EXIT, _HEADER], dtype=np.int64))


def receive(conn, timeout_s: float) -> np.ndarray | None:
    """A worker's next message from rank 0, or None if none came within timeout_s (EOFError: rank 0 is gone)."""
    if not conn.poll(timeout_s):
        return None
    return np.frombuffer(conn.recv_bytes(), dtype=np.int64)
