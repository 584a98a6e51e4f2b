"""Model level: the last decoder layer computes only the rows that make logits (utils/context.py output_rows,
model/qwen2.py forward_rows) and gives the logits of the whole layer: the same greedy tokens, logits within
rounding (those rows' attention runs as a decode over the cache), and identical KV caches after every step (K/V of
every row still go to the cache), over prefill, chunked-prefill, mixed and decode steps with images."""
from __future__ import annotations

import pytest
import torch
from cpu_kernel_helpers import require_panel_linear
from engine_helpers import QUESTIONS, make_engine, run_all

import bunny_backend.engine.worker.model_runner as model_runner
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.ops import cpu_kernels
from bunny_backend.utils.context import get_context


def _run(path, arrivals, dtype: str, whole_layer: bool, monkeypatch):
    engine = make_engine(path, dtype=dtype, max_num_batched_tokens=64)
    runner = engine.runner
    steps, pruned = [], {"steps": 0}
    compute_logits, run = engine.model.compute_logits, runner.run

    def record_logits(hidden):
        logits = compute_logits(hidden)
        steps[-1]["logits"].append(logits.float().clone())
        return logits

    def record_step(sched):
        steps.append({"logits": []})
        out = run(sched)
        steps[-1]["caches"] = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        return out

    real_forward = engine.model.forward

    def watch_forward(embeds, positions):
        pruned["steps"] += get_context().output_rows is not None
        return real_forward(embeds, positions)

    engine.model.compute_logits, runner.run, engine.model.forward = record_logits, record_step, watch_forward
    with monkeypatch.context() as m:
        if whole_layer:
            paged_context = model_runner.paged_context
            m.setattr(model_runner, "paged_context", lambda *a, finals=None, **k: paged_context(*a, **k))
        results = run_all(engine, arrivals)
    assert (pruned["steps"] > 0) != whole_layer
    return results, steps


@pytest.mark.parametrize("dtype,config,kernels", [
    ("float32", dict(seed=21, num_heads=4, num_kv_heads=4), True),
    ("bfloat16", dict(seed=22, num_heads=8, num_kv_heads=2), True),
    ("float32", dict(seed=21, num_heads=4, num_kv_heads=4), False),
], ids=["fp32-mha", "bf16-gqa", "fp32-portable"])
def test_last_layer_on_output_rows_matches_the_whole_layer(checkpoint_factory, test_images, monkeypatch, dtype,
                                                          config, kernels):
    if not kernels:
        monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    elif dtype == "bfloat16":
        require_panel_linear(monkeypatch, torch.bfloat16)
    path = checkpoint_factory(**config)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    arrivals = [(0, "a", QUESTIONS[0], [], params), (0, "b", QUESTIONS[1], [test_images[0]], params),
                (2, "c", QUESTIONS[3], [test_images[1]], params), (4, "d", QUESTIONS[4], [], params)]
    got, got_steps = _run(path, arrivals, dtype, False, monkeypatch)
    want, want_steps = _run(path, arrivals, dtype, True, monkeypatch)
    assert got == want
    assert len(got_steps) == len(want_steps) > 12
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == "float32" else dict(atol=0.1, rtol=0.05)
    for i, (a, b) in enumerate(zip(got_steps, want_steps)):
        assert len(a["logits"]) == len(b["logits"]), f"step {i}"
        for x, y in zip(a["logits"], b["logits"]):
            torch.testing.assert_close(x, y, **tol, msg=lambda m: f"step {i}: {m}")
        for layer, ((k1, v1), (k2, v2)) in enumerate(zip(a["caches"], b["caches"])):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), f"step {i}, layer {layer}: caches differ"
