"""Op level (issue #30): the int8 column-panel linear (ops/csrc/int8_panel_linear.cpp) against a float64 oracle,
x @ (q * scale)^T + bias, on ragged panels, 1-130 rows, with and without bias, strided inputs, 1 and 2 threads;
and the CPU layout's choice of it for int8 linears where the VNNI kernel does not build. Skips, naming why, where the
kernel cannot be built."""
import pytest
import torch

from bunny_backend.model.cpu_layout import Int8PanelLinear, use_cpu_linears
from bunny_backend.model.loader import load_model
from bunny_backend.model.quantized_linear import Int8Linear, quantize_model
from bunny_backend.ops import cpu_kernels
from cpu_kernel_helpers import cpu_flags, require_kernel, unavailable


@pytest.fixture
def kernel(monkeypatch):
    require_kernel(monkeypatch, "int8_panel_linear")
    op = cpu_kernels.int8_panel_linear()
    if op is None:
        if "avx512f" in cpu_flags():
            unavailable("this CPU has AVX-512 but the int8 panel build does not take it")
        pytest.skip("the int8 panel kernel needs AVX-512")
    return op


def case(n, k, rows, seed, dtype, strided, with_bias):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    x = torch.randn(rows, 3 * k, generator=gen).to(dtype)
    x = x[:, ::3] if strided else x[:, :k].contiguous()
    bias = torch.randn(n, generator=gen) if with_bias else None
    want = x.double() @ (q.double() * scale.double()[:, None]).t()
    return q, scale, x, bias, want if bias is None else want + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", [(1, 1), (31, 16), (32, 3), (33, 64), (100, 67), (151, 1024)])
@pytest.mark.parametrize("rows", [1, 2, 11, 12, 13, 25, 130])
def test_kernel_matches_the_oracle(kernel, dtype, n, k, rows):
    q, scale, x, bias, want = case(n, k, rows, n * 1000 + k + rows, dtype, strided=rows % 3 == 1,
                                   with_bias=rows % 2 == 1)
    y = kernel(x, torch.ops.bunny.pack_int8_panels(q), scale, n, bias)
    assert y.dtype == dtype and y.shape == (rows, n)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2   # bf16: the output's own rounding
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tolerance


def test_one_thread_and_two_give_the_same_result(kernel):
    q, scale, x, bias, want = case(300, 256, 20, 5, torch.float32, strided=True, with_bias=True)
    panels, threads = torch.ops.bunny.pack_int8_panels(q), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, panels, scale, 300, bias)
        torch.set_num_threads(2)
        two = kernel(x, panels, scale, 300, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert ((one.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_refusals_name_the_problem(kernel):
    panels = torch.ops.bunny.pack_int8_panels(torch.zeros(40, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="x has 9 features, the panels 8"):
        kernel(torch.zeros(2, 9), panels, torch.ones(40), 40, None)
    with pytest.raises(RuntimeError, match="out_features 70 does not match 2 panels"):
        kernel(torch.zeros(2, 8), panels, torch.ones(70), 70, None)
    with pytest.raises(RuntimeError, match=r"scale must be \[40\]"):
        kernel(torch.zeros(2, 8), panels, torch.ones(39), 40, None)
    with pytest.raises(RuntimeError, match="q must be int8"):
        torch.ops.bunny.pack_int8_panels(torch.zeros(4, 4))


def test_without_vnni_the_cpu_layout_puts_int8_linears_in_panels(kernel, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "int8_vnni_linear", lambda: None)   # where it builds, int8 goes there
    model = load_model(tiny_checkpoint, torch.float32)
    quantize_model(model, "int8")
    portable = model.model.layers[0].mlp.gate_up_proj
    x = torch.randn(3, portable.in_features)
    want = portable(x)
    use_cpu_linears(model)
    layer = model.model.layers[0]
    assert all(isinstance(m, Int8PanelLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj, model.lm_head))
    assert torch.allclose(layer.mlp.gate_up_proj(x), want, rtol=1e-5, atol=1e-5)


def test_without_the_kernel_int8_keeps_the_portable_path(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    model = load_model(tiny_checkpoint, torch.float32)
    quantize_model(model, "int8")
    use_cpu_linears(model)
    assert type(model.model.layers[0].mlp.down_proj) is Int8Linear and type(model.lm_head) is Int8Linear
