"""Op level: the decoder's fused CPU ops (ops/csrc/decoder_ops.cpp) against the PyTorch code they replace
(model/layers.py, model/qwen2.py), strided inputs, refusals; model level: the fused model's logits and greedy tokens
against the transformers-composed reference. Skip, naming the reason, where this machine cannot build them."""
import pytest
import torch
import torch.nn.functional as F

from bunny_backend.engine.sampling_params import SamplingParams
from bunny_backend.model.cpu_layout import use_fused_cpu_ops
from bunny_backend.model.layers import RMSNorm, apply_rotary, rotary_cos_sin
from bunny_backend.model.loader import load_model
from bunny_backend.io.tokenizer import load_tokenizer
from bunny_backend.ops import cpu_kernels
from bunny_backend.ops.sampler import Sampler
from bunny_backend.tools.reference import ReferenceBunny
from cpu_kernel_helpers import require_kernel
from model_helpers import dense_greedy, dense_logits, pixels_of, prompt_ids

DTYPES = [torch.float32, torch.bfloat16]
EPS = 1e-6


@pytest.fixture
def ops(monkeypatch):
    require_kernel(monkeypatch, "decoder_ops")
    return cpu_kernels.decoder_ops()


def same_up_to_rounding(got, want, dtype, ulps=1):
    """float32: the float sums' order differs; bfloat16: equal, or `ulps` units of the last place apart."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
        assert ((got.float() - want.float()).abs() <= ulps * ulp).all()


def norm_with(dtype, n, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(n, EPS)
    norm.weight.data = torch.randn(n, generator=gen) * 0.5 + 1
    return norm.to(dtype), gen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(1, 8), (3, 1024), (10, 1024), (257, 96)])
def test_rms_norm_and_add_rms_norm(ops, dtype, rows, n):
    norm, gen = norm_with(dtype, n, rows * n)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    residual = torch.randn(rows, n, generator=gen).to(dtype)
    same_up_to_rounding(ops.rms_norm(x, norm.weight, EPS), norm(x), dtype)
    y, s = ops.add_rms_norm(x, residual, norm.weight, EPS)
    assert torch.equal(s, x + residual)   # the residual stream is rounded exactly as `x + residual` is
    same_up_to_rounding(y, norm(x + residual), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,heads,kv_heads,head_dim", [(1, 4, 4, 8), (7, 8, 2, 16), (130, 16, 16, 64)])
def test_rotary_qk_reads_q_and_k_out_of_the_fused_projection(ops, dtype, rows, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(rows + heads)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(rows, q_size + 2 * kv_size, generator=gen).to(dtype)
    positions = torch.randint(0, 4000, (rows,), generator=gen)
    cos, sin = rotary_cos_sin(positions, head_dim, 1e6, dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    got_q, got_k = ops.rotary_qk(qkv, cos, sin, heads, kv_heads, head_dim)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    same_up_to_rounding(got_q, apply_rotary(q.view(-1, heads, head_dim), cos, sin), dtype, ulps=0)
    same_up_to_rounding(got_k, apply_rotary(k.view(-1, kv_heads, head_dim), cos, sin), dtype, ulps=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,inter", [(1, 8), (10, 2816), (75, 200)])
def test_silu_mul(ops, dtype, rows, inter):
    gate_up = (torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    got, want = ops.silu_mul(gate_up), F.silu(gate) * up
    if dtype == torch.float32:
        return same_up_to_rounding(got, want, dtype)
    # The vector exp differs from ATen's in the last float bits, which can flip the rounding of silu(gate) to
    # bf16 (one unit, then multiplied by up) in a few elements.
    bound = 2 * torch.finfo(dtype).eps * (F.silu(gate.float()) * up.float()).abs()
    assert ((got.float() - want.float()).abs() <= bound).all()
    assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(ops, dtype):
    """Views whose rows are further apart than their width (a slice of a wider tensor), as the model passes."""
    norm, gen = norm_with(dtype, 64, 5)
    wide = torch.randn(9, 200, generator=gen).to(dtype)
    x, residual = wide[:, :64], wide[:, 100:164]
    same_up_to_rounding(ops.rms_norm(x, norm.weight, EPS), norm(x), dtype)
    y, s = ops.add_rms_norm(x, residual, norm.weight, EPS)
    assert torch.equal(s, x + residual)
    gate_up = wide[:, :128]
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate_up[:, :64]) * gate_up[:, 64:], atol=0.05, rtol=0.02)
    assert ops.rms_norm(x[:0], norm.weight, EPS).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 40000), (10, 151936)])
def test_argmax_rows_is_torch_argmax(ops, dtype, rows, vocab):
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    assert torch.equal(ops.argmax_rows(logits), logits.float().argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(logits[:, : vocab // 2 + 1]), logits[:, : vocab // 2 + 1].float().argmax(-1))


def test_argmax_rows_ties_nan_and_infinities_as_torch(ops):
    logits = torch.zeros(5, 70000)
    logits[1, [9, 60000]] = 2.0                        # a tie across the threads' chunks: the first
    logits[2, [50, 65000]] = float("nan")              # NaN counts as the largest, the first one
    logits[2, 10] = float("inf")
    logits[3] = -float("inf")
    logits[4, 69999] = float("inf")
    for dtype in DTYPES:
        x = logits.to(dtype)
        assert ops.argmax_rows(x).tolist() == x.float().argmax(dim=-1).tolist() == [0, 9, 50, 0, 69999]


def test_an_all_greedy_cpu_batch_is_sampled_by_argmax_rows(ops, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "decoder_ops", lambda: calls.append(1) or ops)
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    greedy = Sampler()(logits, [SamplingParams()] * 3, [None] * 3, [[]] * 3).tokens
    assert calls == [1] and torch.equal(greedy, logits.float().argmax(-1))
    Sampler()(logits, [SamplingParams(temperature=0.7)] * 3, [torch.Generator()] * 3, [[]] * 3)
    assert calls == [1]   # a sampled batch takes the float32 path


def test_refusals_name_the_problem(ops):
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match=r"rms_norm: expects a 2-D tensor"):
        ops.rms_norm(torch.ones(2, 3, 8), w, EPS)
    with pytest.raises(RuntimeError, match=r"rms_norm: takes float32 or bfloat16, got Half"):
        ops.rms_norm(torch.ones(2, 8, dtype=torch.float16), w.half(), EPS)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight is BFloat16 but x is Float"):
        ops.rms_norm(torch.ones(2, 8), w.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match=r"add_rms_norm: residual must match x"):
        ops.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), w, EPS)
    with pytest.raises(RuntimeError, match=r"silu_mul: gate_up must have an even number of features"):
        ops.silu_mul(torch.ones(2, 7))
    with pytest.raises(RuntimeError, match=r"rotary_qk: qkv has 40 features, fewer than q, k and v need \(48\)"):
        ops.rotary_qk(torch.ones(2, 40), torch.ones(2, 8), torch.ones(2, 8), 4, 1, 8)
    with pytest.raises(RuntimeError, match=r"argmax_rows: rows must not be empty"):
        ops.argmax_rows(torch.ones(2, 0))
    with pytest.raises(RuntimeError, match=r"rotary_qk: cos and sin must be \[2, 8\]"):
        ops.rotary_qk(torch.ones(2, 48), torch.ones(2, 4), torch.ones(2, 4), 4, 1, 8)


@pytest.mark.parametrize("config", [dict(seed=3, num_heads=4, num_kv_heads=4, tie_word_embeddings=False),
                                    dict(seed=4, num_heads=8, num_kv_heads=2, tie_word_embeddings=True)],
                         ids=["mha-untied", "gqa-tied"])
def test_fused_model_matches_the_reference(ops, checkpoint_factory, test_images, config):
    path = checkpoint_factory(**config)
    ours, ref, tok = load_model(path), ReferenceBunny.from_pretrained(path), load_tokenizer(path)
    use_fused_cpu_ops(ours)
    layer = ours.model.layers[0]
    assert layer.input_layernorm.ops is ops and layer.self_attn.ops is ops and layer.mlp.ops is ops
    pixels = pixels_of(test_images[1], ours.config.vision.image_size)
    ids = prompt_ids(tok, "What is in this picture?", True)
    with torch.inference_mode():
        torch.testing.assert_close(dense_logits(ours, ids, pixels), ref.logits(ids, pixels), atol=1e-4, rtol=1e-4)
    assert dense_greedy(ours, ids, pixels, 24) == ref.generate_greedy(ids, pixels, max_new_tokens=24)
