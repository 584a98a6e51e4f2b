"""Op level: the sampler's logprobs are the log-softmax of the RAW logits (before penalties, banned tokens and
temperature), for the rows that asked, with their top alternatives sorted; torch.log_softmax in float64 is the
oracle."""
import pytest
import torch

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.ops.sampler import Sampler, raw_logprobs

V = 3000


def random_logits(batch, seed):
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_logprobs_match_float64_log_softmax(dtype):
    logits = random_logits(4, seed=1).to(dtype)
    want = torch.log_softmax(logits.double(), dim=-1)
    logprobs, top_values, top_ids = raw_logprobs(logits, 7)
    assert logprobs.dtype == top_values.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), want, rtol=0, atol=1e-5)
    ordered = want.sort(dim=-1, descending=True)
    torch.testing.assert_close(top_values.double(), ordered.values[:, :7], rtol=0, atol=1e-5)
    # the ids carry those values (bf16 logits tie: which of equal tokens comes first is free)
    torch.testing.assert_close(want.gather(1, top_ids), ordered.values[:, :7], rtol=0, atol=1e-5)


def test_the_sampler_reports_raw_logprobs_of_the_rows_that_asked():
    logits = random_logits(6, seed=2)
    raw = torch.log_softmax(logits.double(), dim=-1)
    params = [SamplingParams(logprobs=3),                                                 # greedy
              SamplingParams(temperature=0.8, top_k=40),                                  # did not ask
              SamplingParams(temperature=1.3, top_p=0.9, presence_penalty=1.0, frequency_penalty=0.5,
                             repetition_penalty=1.5, logprobs=20),
              SamplingParams(repetition_penalty=2.0, logprobs=1),                         # greedy, penalised
              SamplingParams(),
              SamplingParams(temperature=0.5, logprobs=5)]
    history = [[1, 2], [3], [int(logits[2].argmax())] * 4, [int(logits[3].argmax())], [], [9]]
    banned = [(), (), (int(logits[2].topk(2).indices[1]),), (), (), ()]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None, None,
            torch.Generator().manual_seed(3)]
    out = Sampler()(logits, params, gens, history, [0] * 6, banned)
    tokens = out.tokens.tolist()
    lp = out.logprobs
    assert lp.rows == [0, 2, 3, 5]
    assert lp.top_ids.shape == lp.top_logprobs.shape == (4, 20)
    for j, row in enumerate(lp.rows):
        # raw: the penalties, the ban and the temperature that chose the token do not show in its logprob
        assert abs(float(lp.chosen[j]) - float(raw[row, tokens[row]])) < 1e-5
        ordered = raw[row].sort(descending=True)
        assert lp.top_ids[j].tolist() == ordered.indices[:20].tolist()
        torch.testing.assert_close(lp.top_logprobs[j].double(), ordered.values[:20], rtol=0, atol=1e-5)
    assert tokens[3] != int(logits[3].argmax())        # the penalty moved the choice, not the logprobs


def test_no_logprobs_when_nobody_asks():
    logits = random_logits(2, seed=3)
    out = Sampler()(logits, [SamplingParams(), SamplingParams(temperature=1.0)],
                    [None, torch.Generator().manual_seed(0)], [[], []])
    assert out.logprobs is None
