"""Batched next-token sampling: raw logprobs, penalties (repetition, presence, frequency), banned tokens,
temperature, top-k, top-p, greedy rows.

The order, vLLM's: the model's raw logits -> the logprobs of the rows that asked for them (raw: before anything
else touches the logits) -> penalties and banned tokens -> temperature, top-k/top-p and the draw.

Per-request reproducibility: a sampled row's randomness is one uniform drawn from its own CPU generator, turned into
a token by inverse CDF over that row's truncated distribution. Nothing else in the batch touches that generator, and
every step a row goes through depends on that row alone, so a seed gives the same tokens whatever the batch holds
and in whatever order.
"""
from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass
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
    presence_penalty: float
    frequency_penalty: float
    logprobs: int

    @property
    def greedy(self) -> bool: ...


def takes_raw_argmax(params: RowParams, banned_token_ids: Collection[int]) -> bool:
    """Whether the row's token is the argmax of the model's raw logits: greedy, with no logprobs, penalties or banned
    tokens (a grammar's mask, which the caller knows of, is another reason it is not)."""
    return (params.greedy and params.logprobs == 0 and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty and not banned_token_ids)


def raw_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of logits [n, V]: the log-softmax in float32 [n, V], and its k largest values per row, most likely first,
    with their ids ([n, k] each)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs, top.values, top.indices


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


def apply_presence_frequency_penalties_(logits: torch.Tensor, presence: list[float], frequency: list[float],
                                        output_token_ids: list[list[int]]) -> torch.Tensor:
    """In place, OpenAI's rule: logit[j] -= frequency * c[j] + presence * (c[j] > 0), where c[j] counts j among
    the row's generated tokens. Rows with both penalties 0 are untouched; ids < 0 or >= V are ignored. `logits`
    is float32 [B, V]; returned for chaining."""
    batch, vocab = logits.shape
    rows = [i for i in range(batch) if (presence[i] or frequency[i]) and output_token_ids[i]]
    if not rows:
        return logits
    device = logits.device
    lengths = torch.tensor([len(output_token_ids[i]) for i in rows])
    ids = torch.full((len(rows), int(lengths.max())), vocab, dtype=torch.long)
    ids[torch.arange(ids.shape[1]) < lengths[:, None]] = torch.tensor(
        list(itertools.chain.from_iterable(output_token_ids[i] for i in rows)), dtype=torch.long)
    # Padding and ignored ids count in one spare column past the vocabulary, dropped after.
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab).to(device, non_blocking=True)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, ids, torch.ones(ids.shape, device=device))[:, :vocab]
    presence_t = torch.tensor([presence[i] for i in rows], dtype=torch.float32).to(device, non_blocking=True)
    frequency_t = torch.tensor([frequency[i] for i in rows], dtype=torch.float32).to(device, non_blocking=True)
    penalty = frequency_t[:, None] * counts + presence_t[:, None] * (counts > 0)
    return logits.index_add_(0, torch.tensor(rows, device=device), penalty, alpha=-1)


def ban_tokens_(logits: torch.Tensor, banned_token_ids: list[Collection[int]]) -> torch.Tensor:
    """In place: the logits of each row's banned ids become -inf (ids < 0 or >= V ignored); returned for chaining."""
    vocab = logits.shape[1]
    pairs = [(i, j) for i, ids in enumerate(banned_token_ids) for j in ids if 0 <= j < vocab]
    if pairs:
        rows, cols = torch.tensor(pairs, dtype=torch.long).to(logits.device, non_blocking=True).unbind(1)
        logits[rows, cols] = float("-inf")
    return logits


@dataclass(slots=True)
class Logprobs:
    """The raw logprobs of the rows that asked for them (params.logprobs > 0)."""
    rows: list[int]                 # those rows of the batch, in order
    chosen: torch.Tensor            # [n] float32: the logprob of each one's sampled token
    top_ids: torch.Tensor           # [n, k] int64, k the largest asked: the most likely first
    top_logprobs: torch.Tensor      # [n, k] float32


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor            # [B] int64, on the logits' device
    logprobs: Logprobs | None       # None when no row asked


class Sampler:
    """`sampler(logits [B, V], params, generators, prev_token_ids, ...) -> SamplerOutput`.

    generators[i] is a CPU torch.Generator; it may be None for a greedy row (greedy rows draw nothing).
    prev_token_ids[i] is prompt + generated ids: all of it is read for a repetition penalty != 1, the generated
    part (from num_prompt_tokens[i] on; default 0) for presence and frequency penalties != 0.
    banned_token_ids[i]: ids the row may not sample (min_tokens keeps EOS out this way).
    mask: what `mask.apply(logits)` turns into logits with the tokens a row's grammar forbids at -inf (a copy), or
    None (engine/structured_output.py's TokenMask)."""

    def __call__(self, logits: torch.Tensor, params: list[RowParams], generators: list[torch.Generator | None],
                 prev_token_ids: list[list[int]], num_prompt_tokens: list[int] | None = None,
                 banned_token_ids: list[Collection[int]] | None = None, mask=None) -> SamplerOutput:
        batch, vocab = logits.shape
        num_prompt_tokens = num_prompt_tokens if num_prompt_tokens is not None else [0] * batch
        banned_token_ids = banned_token_ids if banned_token_ids is not None else [()] * batch
        if not (len(params) == len(generators) == len(prev_token_ids) == len(num_prompt_tokens)
                == len(banned_token_ids) == batch):
            raise ValueError(f"batch of {batch} logits rows but {len(params)} params, {len(generators)} generators, "
                             f"{len(prev_token_ids)} token lists, {len(num_prompt_tokens)} prompt lengths, "
                             f"{len(banned_token_ids)} banned lists")
        asked = [i for i, p in enumerate(params) if p.logprobs > 0]
        if asked:
            index = torch.tensor(asked, device=logits.device)
            rows = logits if len(asked) == batch else logits[index]
            logprobs, top_logprobs, top_ids = raw_logprobs(rows, min(max(params[i].logprobs for i in asked), vocab))
        adjusted = self._penalised(logits, params, prev_token_ids, num_prompt_tokens, banned_token_ids)
        if mask is not None:   # structured output: after the penalties, before temperature, top-k and top-p
            adjusted = mask.apply(logits.float() if adjusted is None else adjusted)
        tokens = self._pick(logits if adjusted is None else adjusted, params, generators, adjusted is None)
        if not asked:
            return SamplerOutput(tokens, None)
        chosen = logprobs.gather(1, tokens[index][:, None]).squeeze(1)
        return SamplerOutput(tokens, Logprobs(asked, chosen, top_ids, top_logprobs))

    @staticmethod
    def _penalised(logits: torch.Tensor, params: list[RowParams], prev_token_ids: list[list[int]],
                   num_prompt_tokens: list[int], banned_token_ids: list[Collection[int]]) -> torch.Tensor | None:
        """A float32 copy of the logits with the rows' penalties and banned tokens applied; None when no row has
        any (the logits are then sampled as they are)."""
        repetition = [p.repetition_penalty for p in params]
        presence = [p.presence_penalty for p in params]
        frequency = [p.frequency_penalty for p in params]
        if all(r == 1.0 for r in repetition) and not any(presence) and not any(frequency) \
                and not any(banned_token_ids):
            return None
        logits = logits.to(torch.float32, copy=True)
        if any(r != 1.0 for r in repetition):
            apply_repetition_penalty_(logits, repetition, prev_token_ids)
        if any(presence) or any(frequency):
            generated = [ids[n:] if pp or fp else [] for ids, n, pp, fp in
                         zip(prev_token_ids, num_prompt_tokens, presence, frequency)]
            apply_presence_frequency_penalties_(logits, presence, frequency, generated)
        return ban_tokens_(logits, banned_token_ids)

    def _pick(self, logits: torch.Tensor, params: list[RowParams], generators: list[torch.Generator | None],
              raw: bool) -> torch.Tensor:
        """Each row's token: greedy rows the argmax, the others drawn (temperature, top-k/top-p). raw: the logits
        are the model's own, in its dtype (a CPU greedy batch then takes the fused argmax)."""
        batch = logits.shape[0]
        device = logits.device
        greedy = [p.greedy for p in params]
        if raw and all(greedy) and (tokens := _cpu_argmax(logits)) is not None:
            return tokens
        logits = logits.float()
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
