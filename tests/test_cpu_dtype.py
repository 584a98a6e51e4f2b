"""CPU dtypes: the capability check before choosing a weight layout, and what `dtype auto` picks.

CPUs without AVX-512 cannot be had here, so their capabilities are faked (utils.cpu_features.detect) and oneDNN's
bf16 weight reorder is made to fail as it does on such a CPU; the engine must then load and run, never reach it.
"""
import logging

import pytest
import torch

from bunny_backend.engine.worker import device
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.model import cpu_layout
from bunny_backend.model.cpu_layout import OneDnnLinear, PanelLinear, TransposedLinear, cpu_linear_class, use_cpu_linears
from bunny_backend.ops import cpu_kernels
from bunny_backend.model.loader import load_model
from bunny_backend.utils.cpu_features import CpuFeatures, detect
from engine_helpers import QUESTIONS, make_engine
from model_helpers import BF16_REL_ERR, TOP1_AGREEMENT, agreement, teacher_forced

AVX2_ONLY = CpuFeatures(isa="AVX2", flags=frozenset({"avx2", "fma"}), onednn=True, onednn_bf16=False,
                        onednn_fp16=False)
AVX512_NO_BF16 = CpuFeatures(isa="AVX512", flags=frozenset({"avx2", "avx512f", "avx512bw"}), onednn=True,
                             onednn_bf16=True, onednn_fp16=False)
AVX512_BF16 = CpuFeatures(isa="AVX512", flags=frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"}),
                          onednn=True, onednn_bf16=True, onednn_fp16=False)
AMX = CpuFeatures(isa="AVX512", flags=frozenset({"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"}),
                  onednn=True, onednn_bf16=True, onednn_fp16=False)
NO_ONEDNN = CpuFeatures(isa="AVX2", flags=frozenset({"avx2"}), onednn=False, onednn_bf16=False, onednn_fp16=False)


def test_this_cpu_is_described():
    cpu = detect()
    assert cpu.isa and cpu.can_pack(torch.float32) == cpu.onednn
    assert set(cpu.describe()) >= {"isa", "flags", "onednn_bf16", "native_bf16"}


@pytest.mark.parametrize("cpu, dtype, expected", [
    (AVX2_ONLY, torch.float32, OneDnnLinear),
    (AVX2_ONLY, torch.bfloat16, TransposedLinear),       # oneDNN's bf16 reorder needs AVX512BW
    (AVX2_ONLY, torch.float16, TransposedLinear),
    (AVX512_NO_BF16, torch.bfloat16, OneDnnLinear),      # oneDNN emulates bf16 with AVX512BW
    (AVX512_BF16, torch.bfloat16, OneDnnLinear),
    (AVX512_BF16, torch.float16, TransposedLinear),
    (NO_ONEDNN, torch.float32, TransposedLinear),
])
def test_layout_follows_the_capabilities(cpu, dtype, expected):
    assert cpu_linear_class(dtype, cpu) is expected


@pytest.mark.parametrize("cpu, expected", [
    (AVX2_ONLY, torch.float32), (NO_ONEDNN, torch.float32), (AVX512_NO_BF16, torch.float32),
    (AVX512_BF16, torch.bfloat16), (AMX, torch.bfloat16),
])
def test_auto_dtype_on_cpu(cpu, expected):
    assert device.resolve_dtype("auto", torch.device("cpu"), cpu) == expected
    assert device.resolve_dtype("float32", torch.device("cpu"), cpu) == torch.float32


def test_bf16_without_onednn_bf16_is_said_once(caplog):
    with caplog.at_level(logging.WARNING, logger="bunny.engine"):
        assert device.resolve_dtype("bfloat16", torch.device("cpu"), AVX2_ONLY) == torch.bfloat16
    assert "AVX512BW" in caplog.text and "slower than float32" in caplog.text


@pytest.fixture
def avx2_machine(monkeypatch):
    """This process behaves as on an AVX2-only CPU: capabilities say so, oneDNN's bf16 reorder raises, and the
    panel kernel (built for AVX-512 only) takes no dtype."""
    real = OneDnnLinear.__init__

    def reorder(self, linear):
        if linear.weight.dtype == torch.bfloat16:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw, avx512vl "
                               "and avx512dq")
        real(self, linear)

    monkeypatch.setattr(OneDnnLinear, "__init__", reorder)
    monkeypatch.setattr(cpu_layout, "detect", lambda: AVX2_ONLY)
    monkeypatch.setattr(device, "detect", lambda: AVX2_ONLY)
    monkeypatch.setattr(cpu_kernels, "panel_linear", lambda dtype: None)


def test_bf16_engine_runs_on_an_avx2_cpu(avx2_machine, checkpoint_factory):
    engine = make_engine(checkpoint_factory(seed=0), dtype="bfloat16")
    assert engine.dtype == torch.bfloat16
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, TransposedLinear)
    engine.add_request("a", "What is a rabbit?", [], SamplingParams(max_tokens=4, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert sum(len(o.delta_token_ids) for o in outs) == 4 and outs[-1].finish_reason == "length"


def test_auto_is_float32_on_an_avx2_cpu(avx2_machine, checkpoint_factory):
    engine = make_engine(checkpoint_factory(seed=0), dtype="auto")
    assert engine.dtype == torch.float32
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, OneDnnLinear)


@pytest.mark.skipif(not detect().can_pack(torch.bfloat16), reason="oneDNN has no bf16 kernels on this CPU")
def test_bf16_packed_model_tracks_fp32_reference(checkpoint_factory, test_images):
    """The bf16 model in the CPU layout auto may pick: teacher-forced logits within the bf16 tolerance of fp32."""
    path = checkpoint_factory(seed=5, num_kv_heads=2)
    ref = load_model(path)
    bf16 = load_model(path, dtype=torch.bfloat16)
    use_cpu_linears(bf16)
    best = PanelLinear if cpu_kernels.panel_linear(torch.bfloat16) else OneDnnLinear
    assert isinstance(bf16.model.layers[0].mlp.down_proj, best) and isinstance(bf16.lm_head, best)
    tok = load_tokenizer(path)
    images = [test_images[i] if i % 2 else None for i in range(4)]
    got, want = teacher_forced(ref, bf16, tok, QUESTIONS[:4], images)
    rel, top1 = agreement(got, want)
    assert rel < BF16_REL_ERR and top1 >= TOP1_AGREEMENT, (rel, top1)
