"""The `quantization` engine parameter (issue #30) end to end on the CPU: what is quantized and what is not, the
accuracy of an int8 model against the float32 one (teacher-forced, beside bf16's), the same first greedy tokens
through the engine, int8 under tensor parallelism, and the refusals."""
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bunny_backend.config import EngineConfig
from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.engine.worker import device
from bunny_backend.engine.worker.device import DevicePlan
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.model.cpu_layout import Int8PanelLinear, Int8VnniLinear, use_cpu_linears
from bunny_backend.model.loader import load_model
from bunny_backend.model.quantized_linear import Int8Linear, check_tensor_parallel, quantize_model
from bunny_backend.server import cli
from engine_helpers import QUESTIONS, make_engine, run_all
from model_helpers import BF16_REL_ERR, agreement, teacher_forced

QUANTIZED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CHECKPOINT_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def oracle_int8(w: np.ndarray) -> np.ndarray:
    """dequant(quant(w)) in float64: per row, scale = max|w| / 127, round to nearest, clamp to +-127."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def dequantized_checkpoint(src, dst, tp: int = 1):
    """A copy of the checkpoint whose decoder linears and LM head hold the oracle's dequantized weights, as a
    tensor-parallel group of `tp` ranks quantizes them (a row-parallel weight per rank's slice of its inputs)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for name, t in tensors.items():
        module = name.rpartition(".")[0].rpartition(".")[2]
        if name.endswith(".weight") and (module in CHECKPOINT_LINEARS or name == "lm_head.weight"):
            parts = np.split(t.double().numpy(), tp if module in ROW_PARALLEL else 1, axis=1)
            tensors[name] = torch.from_numpy(np.concatenate([oracle_int8(p) for p in parts], axis=1)).to(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_int8_quantizes_the_decoder_linears_and_an_untied_lm_head_only(tiny_checkpoint, caplog):
    model = load_model(tiny_checkpoint, torch.bfloat16)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="bunny.engine"):
        saved = quantize_model(model, "int8")
    after = dict(model.named_parameters())
    quantized = {n for n in before if n == "lm_head.weight"
                 or (n.endswith(".weight") and n.rpartition(".")[0].rpartition(".")[2] in QUANTIZED)}
    assert len(quantized) == 4 * model.config.text.num_hidden_layers + 1
    for name, tensor in before.items():
        if name in quantized:
            module = name.rpartition(".")[0]
            assert name not in after and after[f"{module}.qweight"].dtype == torch.int8
        else:   # embeddings, norms, qkv's bias, the vision tower and the projector: untouched, in bf16
            assert torch.equal(after[name], tensor) and after[name].dtype == torch.bfloat16, name
    # 2 bytes -> 1 per weight, plus a float32 scale per output channel
    want = sum(t.numel() * 2 - t.numel() - 4 * t.shape[0] for n, t in before.items() if n in quantized)
    assert saved == want
    assert "int8 weights" in caplog.text and f"{want / 1e6:.1f} MB saved" in caplog.text


def test_a_tied_lm_head_stays_the_embedding(checkpoint_factory):
    model = load_model(checkpoint_factory(seed=5, tie_word_embeddings=True), torch.float32)
    quantize_model(model, "int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)


def test_int8_agrees_with_float32_about_as_well_as_bf16(tiny_checkpoint, test_images):
    """Teacher-forced over the float32 model's greedy continuations (518 positions, half the prompts with an
    image), int8 on the kernel this CPU serves it with (the VNNI kernel with 16-bit activations where it builds, else
    the widening one, else the portable path). Measured on this checkpoint: top-1 agreement with float32 95.8% for
    bf16; int8 94.0% on the VNNI kernel, 94.4% on the widening one (94.0% on the portable path, 94.2% with float32
    activations); relative logit error 0.9%, 1.44% (1.44%, 1.5%, 1.1%); with checkpoint seeds 1-3 the VNNI kernel
    keeps 0.0-1.7 points below bf16. The issue's bound: no more than 2 points below bf16."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    images = [test_images[i % 4] if i % 2 == 0 else None for i in range(len(QUESTIONS))]
    ref = load_model(tiny_checkpoint, torch.float32)
    bf16 = load_model(tiny_checkpoint, torch.bfloat16)
    int8 = load_model(tiny_checkpoint, torch.bfloat16)
    quantize_model(int8, "int8")
    use_cpu_linears(int8)
    got, want = teacher_forced(ref, bf16, tokenizer, QUESTIONS, images)
    bf16_rel, bf16_top1 = agreement(got, want)
    got, want = teacher_forced(ref, int8, tokenizer, QUESTIONS, images)
    int8_rel, int8_top1 = agreement(got, want)
    assert want.shape[0] >= 300
    assert int8_top1 >= bf16_top1 - 0.02, (int8_top1, bf16_top1)
    assert int8_rel < BF16_REL_ERR, (int8_rel, bf16_rel)


def test_w8a8_on_the_vnni_kernel_costs_about_as_much_again_as_int8(tiny_checkpoint, test_images):
    """The same positions with w8a8 on the VNNI kernel (activations quantized per row too), bf16 activations.
    Measured: top-1 93.4% against bf16's 95.8% (2.3 points below: past the issue's 2-point bound, which is why
    int8 takes 16-bit activations), relative logit error 1.83% against int8's 1.44% and bf16's 0.89%; with
    checkpoint seeds 1-3, 2.1-4.1 points below bf16 and 1.83-1.93% error."""
    tokenizer = load_tokenizer(str(tiny_checkpoint))
    images = [test_images[i % 4] if i % 2 == 0 else None for i in range(len(QUESTIONS))]
    ref = load_model(tiny_checkpoint, torch.float32)
    w8a8 = load_model(tiny_checkpoint, torch.bfloat16)
    quantize_model(w8a8, "w8a8")
    use_cpu_linears(w8a8)
    if not isinstance(w8a8.lm_head, Int8VnniLinear):
        pytest.skip("the int8 VNNI kernel needs AVX512-VNNI")
    bf16_rel, bf16_top1 = agreement(*teacher_forced(ref, load_model(tiny_checkpoint, torch.bfloat16), tokenizer,
                                                    QUESTIONS, images))
    rel, top1 = agreement(*teacher_forced(ref, w8a8, tokenizer, QUESTIONS, images))
    assert top1 >= bf16_top1 - 0.03 and rel < 2.5 * bf16_rel, (top1, bf16_top1, rel, bf16_rel)


def greedy(engine, test_images, max_tokens=16):
    reqs = [(0, f"r{i}", q, [test_images[i % 4]] if i % 2 == 0 else [], SamplingParams(max_tokens=max_tokens))
            for i, q in enumerate(QUESTIONS)]
    return {rid: ids for rid, (ids, _, _) in run_all(engine, reqs).items()}


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_the_engine_answers_with_the_same_first_tokens(tiny_checkpoint, test_images):
    """Greedy, float32 activations, the demo questions (half with an image), 16 tokens each. Random weights have
    near-ties that int8's rounding flips, after which the runs part: measured, every answer keeps its first 3
    tokens (common prefixes 7, 16, 3, 16, 10, 16: 68 of 96 tokens)."""
    plain, int8 = (make_engine(tiny_checkpoint, quantization=q) for q in ("none", "int8"))
    assert isinstance(int8.model.lm_head, (Int8Linear, Int8PanelLinear, Int8VnniLinear))
    assert int8.memory_reports[0]["weights_bytes"] < plain.memory_reports[0]["weights_bytes"]
    want, got = greedy(plain, test_images), greedy(int8, test_images)
    prefixes = [common_prefix(want[rid], got[rid]) for rid in want]
    assert min(prefixes) >= 3 and sum(prefixes) >= 0.6 * sum(map(len, want.values())), prefixes


def greedy_with_top2(engine, test_images, max_tokens=16):
    """{request: [(token, top-2 ids, top-2 logprobs) per position]}."""
    for i, q in enumerate(QUESTIONS):
        engine.add_request(f"r{i}", q, [test_images[i % 4]] if i % 2 == 0 else [],
                           SamplingParams(max_tokens=max_tokens, logprobs=2))
    out = {f"r{i}": [] for i in range(len(QUESTIONS))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += [(t, lp.top_ids, lp.top_logprobs) for t, lp in zip(o.delta_token_ids, o.logprobs)]
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_engine_equals_the_unquantized_engine_on_the_oracles_weights(checkpoint_factory, test_images,
                                                                          tmp_path, tp):
    """Greedy tokens of the int8 engine = those of the plain engine on a checkpoint the float64 oracle dequantized
    (float32 activations). Under tensor parallelism each rank quantizes its own slice: a row-parallel o/down
    weight per half of its inputs. The two multiply in another order (x @ q^T * s against x @ (q s)^T), so a
    near-tie may flip: a run may part only where the oracle's two best logprobs are within 1e-3 (seen once, at
    TP=2: 14.15430 against 14.15397), taking the oracle's second choice, and in one answer at most."""
    path = checkpoint_factory(seed=21, num_heads=4, num_kv_heads=4)
    answers = []
    for kwargs in (dict(model_path=dequantized_checkpoint(path, tmp_path / "oracle", tp)),
                   dict(model_path=path, quantization="int8")):
        engine = make_engine(tensor_parallel_size=tp, **kwargs)   # one tensor-parallel group at a time
        try:
            answers.append(greedy_with_top2(engine, test_images))
        finally:
            engine.shutdown()
    want, got = answers
    parted = 0
    for rid in want:
        tokens_want, tokens_got = [t for t, *_ in want[rid]], [t for t, *_ in got[rid]]
        if tokens_got == tokens_want:
            continue
        parted += 1
        at = common_prefix(tokens_want, tokens_got)
        _, top_ids, top_logprobs = want[rid][at]
        assert top_logprobs[0] - top_logprobs[1] < 1e-3 and tokens_got[at] == top_ids[1], (rid, at, want[rid][at])
    assert parted <= 1


# ---- refusals -------------------------------------------------------------------------------------------------
def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"quantization must be one of \('none', 'int8', 'w8a8', 'fp8'\), got 'int4'"):
        EngineConfig.from_parameters({"quantization": "int4"})


def test_fp8_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match=r"fp8 needs a CUDA device with compute capability >= 8.9; this engine "
                                         r"runs on cpu \(on the CPU choose quantization int8\)"):
        DevicePlan.resolve(EngineConfig(device="cpu", quantization="fp8"))


def test_fp8_is_refused_on_a_cuda_device_older_than_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9; NVIDIA A100 has 8.0"):
        device.check_quantization("fp8", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    device.check_quantization("fp8", torch.device("cuda", 0))


def test_int8_refuses_a_tensor_parallel_size_that_does_not_divide_the_channels(checkpoint_factory):
    path = checkpoint_factory(seed=22, num_heads=4, num_kv_heads=1, vocab_size=1537)
    with pytest.raises(ValueError, match=r"quantization int8 with tensor_parallel_size 2: the output channels of "
                                         r"lm_head \(1537\) do not divide by 2"):
        make_engine(path, quantization="int8", tensor_parallel_size=2)
    make_engine(path, quantization="int8")   # the same model on one rank
    from bunny_backend.model.config import TextConfig
    text = TextConfig(hidden_size=96, intermediate_size=100, num_attention_heads=4, num_hidden_layers=1,
                      vocab_size=64, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"gate_proj/up_proj \(100\) do not divide by 8"):
        check_tensor_parallel("int8", text, 8)


def test_bunny_serve_passes_quantization_on(tmp_path):
    args = cli.parse_args(["--model-path", str(tmp_path), "--quantization", "int8"])
    params = cli.write_repository(cli.tritonserver.MODEL_REPOSITORY, tmp_path / "repo", cli.overrides(args))
    assert params["quantization"] == "int8"
    assert EngineConfig.from_parameters(params).quantization == "int8"
    with pytest.raises(SystemExit):
        cli.parse_args(["--model-path", str(tmp_path), "--quantization", "int4"])
