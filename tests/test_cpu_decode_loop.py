"""Model level: the flat CPU decode loop (model/cpu_decode.py) against the decoder's modules over the same steps of
one engine: identical logits at every decode step (it calls the same ops on the same tensors), float32, bfloat16
and w8a8 (the int8 VNNI panels), grouped kv heads, sequences of different lengths whose blocks interleave; and
where it is installed."""
from __future__ import annotations

import pytest
import torch
from cpu_kernel_helpers import cpu_takes_panel_dtype, kernels_required, require_kernel, require_panel_linear
from engine_helpers import QUESTIONS, make_engine, run_all

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.model.cpu_decode import CpuDecodeLoop
from bunny_backend.ops import cpu_kernels

LOOP_KERNELS = ("decoder_ops", "paged_decode")   # and the float32 panel linear


def loop_kernels_available() -> bool:
    return (cpu_kernels.decoder_ops() is not None and cpu_kernels.paged_decode() is not None
            and cpu_kernels.panel_linear(torch.float32) is not None)


@pytest.fixture
def loop_kernels(monkeypatch):
    """Skip (plain pytest) or fail (BUNNY_REQUIRE_CPU_KERNELS=1, as ./build.sh test sets) without the loop's kernels."""
    for name in LOOP_KERNELS:
        require_kernel(monkeypatch, name)
    require_panel_linear(monkeypatch, torch.float32)


def _logits_by_step(engine, arrivals, use_loop: bool) -> list[torch.Tensor]:
    text = engine.model.model
    loop = text.decode_loop
    assert isinstance(loop, CpuDecodeLoop)
    text.decode_loop = loop if use_loop else None
    seen, calls = [], {"loop": 0}
    compute_logits = engine.model.compute_logits

    def record(hidden):
        logits = compute_logits(hidden)
        seen.append(logits.clone())
        return logits

    def counted(*args):
        calls["loop"] += 1
        return loop(*args)

    engine.model.compute_logits = record
    if use_loop:
        text.decode_loop = type("Counted", (), {"runs": staticmethod(loop.runs), "__call__": staticmethod(counted)})()
    run_all(engine, arrivals)
    assert (calls["loop"] > 0) == use_loop
    return seen


@pytest.mark.parametrize("dtype,config,quantization", [
    ("float32", dict(seed=11, num_heads=4, num_kv_heads=4), "none"),
    ("bfloat16", dict(seed=12, num_heads=8, num_kv_heads=2), "none"),
    ("bfloat16", dict(seed=13, num_heads=8, num_kv_heads=2), "w8a8"),
], ids=["fp32-mha", "bf16-gqa", "bf16-gqa-w8a8"])
def test_decode_loop_gives_the_modules_logits(loop_kernels, monkeypatch, checkpoint_factory, test_images, dtype,
                                              config, quantization):
    if dtype == "bfloat16":
        require_panel_linear(monkeypatch, torch.bfloat16)
    if quantization == "w8a8" and cpu_kernels.int8_vnni_linear() is None:
        pytest.skip("w8a8's VNNI kernel needs AVX512-VNNI")
    path = checkpoint_factory(**config)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    arrivals = [(0, "a", QUESTIONS[0], [], params), (0, "b", QUESTIONS[1], [test_images[0]], params),
                (3, "c", QUESTIONS[4], [], SamplingParams(max_tokens=14, ignore_eos=True))]
    engines = [make_engine(path, dtype=dtype, max_num_batched_tokens=256, quantization=quantization) for _ in "ab"]
    with_loop = _logits_by_step(engines[0], arrivals, True)
    without = _logits_by_step(engines[1], arrivals, False)
    assert len(with_loop) == len(without) >= 15
    for step, (a, b) in enumerate(zip(with_loop, without)):
        assert torch.equal(a, b), f"step {step}: logits differ"


def test_decode_loop_only_with_all_its_pieces(tiny_checkpoint, monkeypatch):
    """Not under the kernels' skip: where they load (and wherever ./build.sh test requires them) the engine must run
    the flat loop; where they cannot be built, the portable modules."""
    monkeypatch.delenv(cpu_kernels.ENV_VAR, raising=False)
    if loop_kernels_available():
        assert isinstance(make_engine(tiny_checkpoint).model.model.decode_loop, CpuDecodeLoop)
    else:
        # required: all of them where this CPU takes the float32 panels (AVX-512); without it the loop is legitimately off
        assert not (kernels_required() and cpu_takes_panel_dtype(torch.float32)), \
            "BUNNY_REQUIRE_CPU_KERNELS=1 but the decode loop's kernels do not load"
        assert make_engine(tiny_checkpoint).model.model.decode_loop is None
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")   # the portable code: no kernels, no loop
    assert make_engine(tiny_checkpoint).model.model.decode_loop is None
