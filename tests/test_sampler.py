import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.ops.sampler import Sampler, apply_repetition_penalty_, truncation_thresholds

V = 5000  # above the sampler's top-k candidate window, so both the topk and the full-sort paths run


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample(logits, params, seeds, prev=None):
    prev = prev if prev is not None else [[] for _ in params]
    return Sampler()(logits, params, gens(*seeds), prev).tokens


def random_logits(batch, seed=0):
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax():
    logits = random_logits(4).to(torch.bfloat16)
    params = [SamplingParams()] * 4
    out = Sampler()(logits, params, [None] * 4, [[]] * 4).tokens
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.float().argmax(-1))


def test_top_k_one_is_greedy():
    logits = random_logits(4)
    out = sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 4, [1, 2, 3, 4])
    assert torch.equal(out, logits.argmax(-1))


def test_tiny_top_p_is_greedy():
    logits = random_logits(4)
    out = sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 4, [1, 2, 3, 4])
    assert torch.equal(out, logits.argmax(-1))


def test_mixed_batch_greedy_rows_are_argmax():
    logits = random_logits(4)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=2.0)]
    out = Sampler()(logits, params, [None, *gens(5), None, *gens(6)], [[]] * 4).tokens
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_same_seed_same_tokens_whatever_the_batch():
    target = random_logits(1, seed=7)
    others = random_logits(3, seed=8)
    params = SamplingParams(temperature=1.3, top_p=0.9, top_k=50)
    alone = int(sample(target, [params], [42])[0])
    first = sample(torch.cat([target, others]), [params, SamplingParams(temperature=0.7), SamplingParams(),
                                                  SamplingParams(temperature=1.0, top_k=5)], [42, 1, 2, 3])
    last = sample(torch.cat([others, target]), [SamplingParams(temperature=2.0), SamplingParams(temperature=0.5),
                                                 SamplingParams(top_p=0.5, temperature=1.0), params], [9, 8, 7, 42])
    assert alone == int(first[0]) == int(last[3])

    # Twenty steps with one generator per request replay identically beside different company.
    def run(batch_first, other_seed, other_params):
        g = torch.Generator().manual_seed(123)
        tokens = []
        for step in range(20):
            mine, other = random_logits(1, seed=100 + step), random_logits(2, seed=other_seed + step)
            logits = torch.cat([mine, other]) if batch_first else torch.cat([other, mine])
            ps, gs = [params, other_params, other_params], [g, *gens(step, step + 1)]
            if not batch_first:
                ps, gs = ps[1:] + ps[:1], gs[1:] + gs[:1]
            out = Sampler()(logits, ps, gs, [[]] * 3).tokens
            tokens.append(int(out[0] if batch_first else out[2]))
        return tokens
    replay = run(True, 200, SamplingParams(temperature=1.0))
    assert len(set(replay)) > 1
    assert replay == run(False, 300, SamplingParams()) == run(False, 400, SamplingParams(temperature=0.5, top_p=0.3))


def test_every_kind_of_row_is_batch_invariant():
    flat, peaked = random_logits(1, seed=3) * 0.05, random_logits(1, seed=4)
    rows = [  # (logits, params): temperature only; top-k; top-p settled by topk; top-p needing a full sort
        (peaked, SamplingParams(temperature=0.9)),
        (peaked, SamplingParams(temperature=1.0, top_k=40)),
        (peaked, SamplingParams(temperature=1.0, top_p=0.8)),
        (flat, SamplingParams(temperature=1.0, top_p=0.95)),
        (flat, SamplingParams(temperature=1.0, top_k=3000, top_p=0.9)),
    ]
    for seed in range(5):
        alone = [int(sample(lg, [p], [seed])[0]) for lg, p in rows]
        order = [4, 2, 0, 3, 1]
        batch = sample(torch.cat([rows[i][0] for i in order]), [rows[i][1] for i in order], [seed] * 5)
        assert [int(batch[order.index(i)]) for i in range(5)] == alone


@pytest.mark.parametrize("top_k,top_p,scale", [(40, 1.0, 3), (0, 0.8, 3), (0, 0.9, 0.05), (3000, 0.9, 0.05),
                                               (100, 0.5, 0.3), (1, 0.7, 3)])
def test_truncation_matches_transformers(top_k, top_p, scale):
    logits = random_logits(3, seed=11) * scale
    params = [SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)] * 3
    probs = torch.softmax(logits / 0.7, -1)
    ours = probs >= truncation_thresholds(probs, params)[:, None]
    hf = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k:
        hf = TopKLogitsWarper(top_k)(None, hf)
    hf = TopPLogitsWarper(top_p)(None, hf) if top_p < 1 else hf
    assert torch.equal(ours, hf.isfinite())


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.zeros(1, V)
    logits[0, :3] = torch.tensor([3.0, 2.0, 2.0])
    out = sample(logits.expand(300, V), [SamplingParams(temperature=1.0, top_k=2)] * 300, range(300))
    assert set(out.tolist()) == {0, 1, 2}


def test_top_k_restricts_support():
    logits = random_logits(1)
    allowed = set(logits[0].topk(5).indices.tolist())
    params = [SamplingParams(temperature=5.0, top_k=5)] * 400
    out = sample(logits.expand(400, V), params, range(400))
    assert set(out.tolist()) == allowed  # all five reachable at this temperature, nothing else


def test_top_p_restricts_support():
    logits = torch.full((1, V), -30.0)
    logits[0, :4] = torch.tensor([2.0, 1.5, 1.0, -1.0]).log_softmax(-1)  # ~ 0.49, 0.30, 0.18, 0.02 (rest ~0)
    params = [SamplingParams(temperature=1.0, top_p=0.8)] * 400
    out = sample(logits.expand(400, V), params, range(400))
    assert set(out.tolist()) == {0, 1, 2}  # cumulative mass before token 2 is 0.79 < 0.8; before token 3, 0.97


def test_repetition_penalty_matches_transformers():
    logits = random_logits(3)
    prev = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    got = apply_repetition_penalty_(logits.clone(), [1.3] * 3, prev.tolist())
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_repetition_penalty_ragged_rows_ignore_negative_ids():
    logits = random_logits(3)
    prev = [[5, 5, 7, -1], [], [9]]
    got = apply_repetition_penalty_(logits.clone(), [2.0, 2.0, 1.0], prev)
    expected = logits.clone()
    for i in (5, 7):
        expected[0, i] = logits[0, i] / 2 if logits[0, i] > 0 else logits[0, i] * 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_greedy_uses_penalised_logits():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    out = Sampler()(logits, [SamplingParams(repetition_penalty=2.0)], [None], [[1, 3]]).tokens
    assert out.tolist() == [4]


def test_distribution_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.2])
    n = 2000
    logits = probs.log().expand(n, 3)
    out = sample(logits, [SamplingParams(temperature=1.0)] * n, range(n))
    freq = torch.bincount(out, minlength=3).float() / n
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.04)  # ~3.5 standard deviations


def test_temperature_sharpens_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    n = 2000
    out = sample(probs.log().expand(n, 3), [SamplingParams(temperature=0.5)] * n, range(n))
    expected = torch.softmax(probs.log() / 0.5, -1)
    torch.testing.assert_close(torch.bincount(out, minlength=3).float() / n, expected, rtol=0, atol=0.04)
