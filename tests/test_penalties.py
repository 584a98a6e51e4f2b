"""Op level: presence and frequency penalties (OpenAI's rule, over the generated tokens only) and banned tokens,
against a naive per-element oracle; mixed batches of greedy and sampled rows, with and without penalties."""
from collections import Counter

import pytest
import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.ops.sampler import Sampler, apply_presence_frequency_penalties_, ban_tokens_

V = 3000


def random_logits(batch, seed):
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def random_history(rng, length, vocab=V):
    """Token ids with repeats (drawn from a small pool), so counts above 1 occur."""
    pool = torch.randint(0, vocab, (max(1, length // 3),), generator=rng)
    return pool[torch.randint(0, len(pool), (length,), generator=rng)].tolist()


def oracle_penalised(row: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """OpenAI's definition, element by element: logit[j] - (frequency * c[j] + presence * (c[j] > 0))."""
    counts = Counter(generated)
    return [x - (frequency * counts[j] + presence * (counts[j] > 0)) for j, x in enumerate(row)]


def test_presence_frequency_match_the_oracle_row_by_row():
    rng = torch.Generator().manual_seed(3)
    logits = random_logits(6, seed=1)
    presence = [0.5, 0.0, -1.5, 2.0, 0.0, 1.0]
    frequency = [0.25, 0.0, 1.0, -2.0, 1.5, 0.0]
    generated = [random_history(rng, 40), random_history(rng, 30), random_history(rng, 7), [],
                 random_history(rng, 60), [5, 5, 5, -1, V + 3]]   # negative and out-of-range ids are ignored
    got = apply_presence_frequency_penalties_(logits.clone(), presence, frequency, generated)
    for i in range(6):
        ids = [t for t in generated[i] if 0 <= t < V]
        want = torch.tensor(oracle_penalised(logits[i].double().tolist(), ids, presence[i], frequency[i]),
                            dtype=torch.float64)
        torch.testing.assert_close(got[i].double(), want, rtol=0, atol=1e-5)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])   # no penalty; nothing generated


def test_banned_tokens_get_minus_infinity_and_nothing_else_moves():
    logits = random_logits(3, seed=2)
    got = ban_tokens_(logits.clone(), [[4, 9], [], [V - 1, -1, V]])
    want = logits.clone()
    want[0, 4] = want[0, 9] = want[2, V - 1] = float("-inf")
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_penalises_only_generated_tokens_in_a_mixed_batch(seed):
    """Each row's token equals the one drawn from its oracle-penalised logits alone (no penalties, same seed):
    greedy and sampled rows, with and without penalties, the prompt part of the history not counted."""
    rng = torch.Generator().manual_seed(100 + seed)
    logits = random_logits(6, seed=10 + seed)
    params = [SamplingParams(presence_penalty=1.5, frequency_penalty=0.5),                  # greedy, penalised
              SamplingParams(temperature=0.9, top_k=50, presence_penalty=-0.5, frequency_penalty=2.0),
              SamplingParams(),                                                             # greedy, plain
              SamplingParams(temperature=1.1, top_p=0.9),                                   # sampled, plain
              SamplingParams(temperature=0.7, frequency_penalty=1.0, repetition_penalty=1.2),
              SamplingParams(presence_penalty=2.0)]
    prompt_lens = [10, 0, 5, 8, 12, 4]
    history = [random_history(rng, n + 25) for n in prompt_lens]
    # make the penalised greedy row's best token one it generated, so the penalty has to change the choice
    history[0][-1] = int(logits[0].argmax())
    history[5][-3] = int(logits[5].argmax())
    history[5][0] = int(logits[5].topk(2).indices[1])   # in the prompt: not penalised, so it wins
    seeds = [None, 7, None, 8, 9, None]

    def gen(s):
        return None if s is None else torch.Generator().manual_seed(s)

    out = Sampler()(logits, params, [gen(s) for s in seeds], history, prompt_lens).tokens.tolist()
    for i, p in enumerate(params):
        row = logits[i].double().tolist()
        if p.repetition_penalty != 1.0:   # transformers' rule over prompt + generated, applied first
            for j in set(history[i]):
                row[j] = row[j] / p.repetition_penalty if row[j] > 0 else row[j] * p.repetition_penalty
        row = oracle_penalised(row, history[i][prompt_lens[i]:], p.presence_penalty, p.frequency_penalty)
        plain = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        alone = Sampler()(torch.tensor([row], dtype=torch.float32), [plain], [gen(seeds[i])], [[]]).tokens
        assert out[i] == int(alone[0]), i
    assert out[0] != int(logits[0].argmax()) and out[5] == int(logits[5].topk(2).indices[1])
    assert out[2] == int(logits[2].argmax())


def test_a_banned_best_token_is_never_chosen():
    logits = random_logits(2, seed=4)
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(), SamplingParams(temperature=0.05)]   # the sampled row is near greedy
    for s in range(20):
        out = Sampler()(logits, params, [None, torch.Generator().manual_seed(s)], [[], []], None,
                        [[best[0]], [best[1]]]).tokens.tolist()
        assert out[0] == int(logits[0].topk(2).indices[1]) and out[1] != best[1]
