"""Op level: the column-panel linear (ops/csrc/panel_linear.cpp) that the CPU's linear layers run, against a
float64 oracle; its packing, bias, refusals, thread-count independence; the layout's choice and fallback. The
kernel tests skip, naming the reason, where this machine cannot build it or its build does not take the dtype."""
import pytest
import torch

from bunny_backend.model.cpu_layout import OneDnnLinear, PanelLinear, TransposedLinear, cpu_layout
from bunny_backend.ops import cpu_kernels
from cpu_kernel_helpers import require_panel_linear

DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}   # relative to the largest output


def kernel_for(dtype, monkeypatch):
    return require_panel_linear(monkeypatch, dtype)


def oracle(x, w, bias=None):
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def rel_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(1, 2), (31, 16), (32, 64), (33, 64), (100, 96), (151, 1024)])
@pytest.mark.parametrize("rows", [1, 2, 5, 12, 13, 16, 19, 33, 130])
def test_kernel_matches_the_oracle(monkeypatch, dtype, n, k, rows):
    kernel = kernel_for(dtype, monkeypatch)
    gen = torch.Generator().manual_seed(n * 1000 + k + rows)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if rows % 2 else None
    y = kernel(x, torch.ops.bunny.pack_panels(w), n, None if bias is None else bias.float())
    assert y.dtype == dtype and y.shape == (rows, n)
    assert rel_error(y, oracle(x, w, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_rows_and_no_rows(monkeypatch, dtype):
    kernel = kernel_for(dtype, monkeypatch)
    w = torch.randn(70, 64).to(dtype)
    panels = torch.ops.bunny.pack_panels(w)
    wide = torch.randn(7, 128).to(dtype)
    x = wide[:, ::2]   # strided rows: the op copies them to contiguous first
    assert rel_error(kernel(x, panels, 70), oracle(x, w)) < TOLERANCE[dtype]
    assert kernel(x[:0], panels, 70).shape == (0, 70)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_thread_and_two_give_identical_results(monkeypatch, dtype):
    """Each output column is one panel's own sum, in the same order whatever thread computes it."""
    kernel = kernel_for(dtype, monkeypatch)
    w, x = torch.randn(300, 256).to(dtype), torch.randn(14, 256).to(dtype)
    panels = torch.ops.bunny.pack_panels(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, panels, 300)
        torch.set_num_threads(2)
        two = kernel(x, panels, 300)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_shapes_are_refused_with_a_reason(monkeypatch):
    kernel = kernel_for(torch.float32, monkeypatch)
    panels = torch.ops.bunny.pack_panels(torch.randn(40, 32))
    with pytest.raises(RuntimeError, match="x has 16 features, the panels 32"):
        kernel(torch.randn(2, 16), panels, 40)
    with pytest.raises(RuntimeError, match="out_features 100 does not match 2 panels"):
        kernel(torch.randn(2, 32), panels, 100)
    with pytest.raises(RuntimeError, match=r"bias must be \[40\]"):
        kernel(torch.randn(2, 32), panels, 40, torch.zeros(39))
    if "bfloat16" in torch.ops.bunny.panel_linear_dtypes():
        with pytest.raises(RuntimeError, match="even in_features"):
            torch.ops.bunny.pack_panels(torch.randn(8, 5).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_the_layout_takes_panels_where_it_can(monkeypatch, dtype, bias):
    kernel_for(dtype, monkeypatch)
    linear = torch.nn.Linear(64, 100, bias=bias).to(dtype)
    layout = cpu_layout(linear)
    assert isinstance(layout, PanelLinear)
    x = torch.randn(2, 3, 64).to(dtype)   # any leading shape, as nn.Linear
    assert rel_error(layout(x), oracle(x, linear.weight, linear.bias)) < TOLERANCE[dtype]


def test_the_layout_falls_back_when_the_kernels_are_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert cpu_kernels.panel_linear(torch.float32) is None
    assert isinstance(cpu_layout(torch.nn.Linear(64, 100)), (OneDnnLinear, TransposedLinear))
    with pytest.raises(ValueError, match="no panel kernel"):
        PanelLinear(torch.nn.Linear(64, 100))
