"""Batched next-token sampling: repetition penalty, temperature, top-k, top-p, greedy rows.

Per-request reproducibility: a sampled row's randomness is one uniform drawn from its own CPU generator, turned into
a token by inverse CDF over that row's truncated distribution. Nothing else in the batch touches that generator, and
every step a row goes through depends on that row alone, so a seed gives the same tokens whatever the batch holds
and in whatever order.
"""
from __future__ import annotations

import itertools
from typing import Protocol

import torch

from bunny_backend.ops import cpu_kernels

# Top-p is first tried on this many most likely tokens; a nucleus that does not fit falls back to a full sort.
_CANDIDATES = 1024


def _cpu_argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """Greedy tokens from CPU logits by our fused op (bf16 read as is, rows split over the threads), else None."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.float32, torch.bfloat16) or not logits.shape[-1]:
        return None
    ops = cpu_kernels.decoder_ops()
    return None if ops is None else ops.argmax_rows(logits)


class RowParams(Protocol):
    """What the sampler reads of a row's parameters (the engine's SamplingParams has it; ops import no engine)."""
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    @property
    def greedy(self) -> bool: ...


def apply_repetition_penalty_(logits: torch.Tensor, penalties: list[float],
                              prev_token_ids: list[list[int]]) -> torch.Tensor:
    """In place, HF semantics: for ids seen in the row's sequence, positive logits are divided by the penalty,
    negative ones multiplied. Ids < 0 or >= V are ignored. `logits` is float32 [B, V]; returned for chaining."""
    batch, vocab = logits.shape
    device = logits.device
    rows = [ids if p != 1.0 else [] for ids, p in zip(prev_token_ids, penalties)]
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max()) if batch else 0
    if width == 0:
        return logits
    ids = torch.full((batch, width), -1, dtype=torch.long)
    ids[torch.arange(width) < lengths[:, None]] = torch.tensor(list(itertools.chain.from_iterable(rows)),
                                                               dtype=torch.long)
    ids = ids.to(device, non_blocking=True)
    # Padding and ignored ids become copies of a valid id of the same row, so the scatter writes that one value
    # twice; a row with none points at id 0 with penalty 1 (x / 1 and x * 1 are exact).
    valid = (ids >= 0) & (ids < vocab)
    first_valid = ids.gather(1, valid.to(torch.uint8).argmax(dim=1, keepdim=True)).clamp(0, vocab - 1)
    ids = torch.where(valid, ids, first_valid)
    penalty = torch.tensor(penalties, dtype=torch.float32).to(device, non_blocking=True)
    penalty = torch.where(valid.any(dim=1), penalty, 1.0)[:, None]
    seen = logits.gather(1, ids)
    return logits.scatter_(1, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


class Sampler:
    """`sampler(logits [B, V], params, generators, prev_token_ids) -> token ids [B] int64` on logits' device.

    generators[i] is a CPU torch.Generator; it may be None for a greedy row (greedy rows draw nothing).
    prev_token_ids[i] is prompt + generated ids, only read when the row's repetition_penalty != 1.
    mask: what `mask.apply(logits)` turns into logits with the tokens a row's grammar forbids at -inf (a copy), or
    None (engine/structured_output.py's TokenMask)."""

    def __call__(self, logits: torch.Tensor, params: list[RowParams],
                 generators: list[torch.Generator | None], prev_token_ids: list[list[int]],
                 mask=None) -> torch.Tensor:
        batch, vocab = logits.shape
        if not (len(params) == len(generators) == len(prev_token_ids) == batch):
            raise ValueError(f"batch of {batch} logits rows but {len(params)} params, {len(generators)} generators, "
                             f"{len(prev_token_ids)} token lists")
        device = logits.device
        penalties = [p.repetition_penalty for p in params]
        greedy = [p.greedy for p in params]
        if any(p != 1.0 for p in penalties):
            logits = apply_repetition_penalty_(logits.to(torch.float32, copy=True), penalties, prev_token_ids)
        elif all(greedy) and mask is None and (tokens := _cpu_argmax(logits)) is not None:
            return tokens
        else:
            logits = logits.float()
        if mask is not None:   # structured output: after the penalties, before temperature, top-k and top-p
            logits = mask.apply(logits)

        if all(greedy):
            return logits.argmax(dim=-1)

        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        # Only the non-greedy rows go through the (sort-heavy) sampling path.
        rows = logits if len(sampled_rows) == batch else logits[torch.tensor(sampled_rows, device=device)]
        sub = [params[i] for i in sampled_rows]
        uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled_rows])
        tokens = self._sample(rows, sub, uniforms.to(device, non_blocking=True))
        if len(sampled_rows) == batch:
            return tokens
        out = logits.argmax(dim=-1)
        out[torch.tensor(sampled_rows, device=device)] = tokens
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, params: list[RowParams], uniforms: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k/top-p as a probability threshold, then inverse CDF in vocabulary order."""
        n, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        probs = torch.softmax(logits / temperature.to(device, non_blocking=True)[:, None], dim=-1)

        truncated = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
        if len(truncated) == n:
            probs.masked_fill_(probs < truncation_thresholds(probs, params)[:, None], 0.0)
        elif truncated:
            index = torch.tensor(truncated, device=device)
            threshold = torch.zeros(n, device=device)
            threshold[index] = truncation_thresholds(probs[index], [params[i] for i in truncated])
            probs.masked_fill_(probs < threshold[:, None], 0.0)

        # The cumulative sum runs in token-id order, not sorted order, so the tie order of a sort can't change the
        # token a given uniform selects. 1 - u lies in (0, 1]: the target is positive and at most the total, so
        # searchsorted (first cdf >= target) always lands on a token with positive probability.
        cdf = probs.cumsum(dim=-1)
        target = (1.0 - uniforms)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, target).clamp_(max=vocab - 1).squeeze(1)


def truncation_thresholds(probs: torch.Tensor, params: list[RowParams]) -> torch.Tensor:
    """Per row, the smallest probability that top-k then top-p (on the renormalised top-k) keep; ties with it are kept
    too, so the kept set does not depend on sort order. Rows whose nucleus lies within the first _CANDIDATES
    tokens are settled by a cheap topk; the others by a full sort. Which way a row goes depends on that row alone."""
    n, vocab = probs.shape
    device = probs.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params]).to(device)
    # top_p 1 must keep all of the top-k even where float rounding makes `mass before` equal the k-mass: use 2.
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], dtype=torch.float32).to(device)
    total = probs.sum(dim=-1)
    width = min(_CANDIDATES, vocab)
    threshold, settled = _threshold_from_sorted(probs.topk(width, dim=-1).values, top_k, top_p, total, vocab)
    if not bool(settled.all()):
        rest = (~settled).nonzero().squeeze(1)
        full = probs[rest].sort(dim=-1, descending=True).values
        threshold[rest] = _threshold_from_sorted(full, top_k[rest], top_p[rest], total[rest], vocab)[0]
    return threshold


def _threshold_from_sorted(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, total: torch.Tensor,
                           vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the `width` largest probabilities (descending; top_k == vocab means off): the threshold, and whether it
    is certain: the k-mass needed to renormalise lies in the window, or (no top-k) the nucleus ends inside it."""
    n, width = sorted_probs.shape
    position = torch.arange(width, device=sorted_probs.device)[None, :]
    k_in_window = top_k <= width
    sorted_probs = sorted_probs * (position < top_k[:, None])
    cumulative = sorted_probs.cumsum(dim=-1)
    k_mass = cumulative.gather(1, (top_k.clamp(max=width) - 1)[:, None]).squeeze(1)
    mass = torch.where(k_in_window, k_mass, total)
    # Keep position j while the mass before it is under p: a prefix, never empty.
    keep = (cumulative - sorted_probs < top_p[:, None] * mass[:, None]) & (position < top_k[:, None])
    kept = keep.sum(dim=-1).clamp_(min=1)
    threshold = sorted_probs.gather(1, (kept - 1)[:, None]).squeeze(1)
    settled = k_in_window | ((top_k == vocab) & (kept < width))
    return threshold, settled
