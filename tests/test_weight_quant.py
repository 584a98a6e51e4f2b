"""Op level (issue #30): symmetric per-output-channel weight quantization (ops/weight_quant.py) against float64
numpy oracles written here (int8: scale = max|w| / 127, round to nearest, clamp; E4M3: the format's own value grid,
decoded from its bits here, round to nearest even), and the portable int8 linear (ops/int8_linear.py) against
float64 x @ dequant(W)^T on ragged shapes. The FP8 matmul (`torch._scaled_mm`) runs on CUDA only."""
import numpy as np
import pytest
import torch

from bunny_backend.model.quantized_linear import Fp8Linear, Int8Linear
from bunny_backend.ops.int8_linear import int8_linear
from bunny_backend.ops.weight_quant import dequantize, quantize_fp8, quantize_int8


def weights(rows, cols, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    w[0] = 0   # an all-zero channel
    return w.to(dtype)


def int8_oracle(w: np.ndarray):
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.round(w / scale[:, None]), -127, 127)
    return q, scale


def e4m3_grid() -> np.ndarray:
    """Every finite non-negative E4M3 (fn) value: 4 exponent bits (bias 7), 3 mantissa bits, subnormals at
    exponent 0, no infinities, S.1111.111 is NaN (so the largest is 1.75 * 2^8 = 448)."""
    values = []
    for bits in range(0x7F):   # 0x7F is NaN
        exp, man = bits >> 3, bits & 7
        values.append(man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return np.array(sorted(values))


def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest E4M3 value, ties to the even mantissa (values are within +-448 here)."""
    grid, mag = e4m3_grid(), np.abs(x)
    hi = np.clip(np.searchsorted(grid, mag), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    even_hi = (hi % 2) == 0   # index parity is mantissa parity: the grid steps one mantissa code at a time
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & even_hi)
    return np.sign(x) * np.where(pick_hi, grid[hi], grid[lo])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (130, 67), (4100, 16)])   # 4100 rows: more than one block
def test_int8_quantization_matches_the_oracle(dtype, shape):
    w = weights(*shape, seed=shape[0] + shape[1], dtype=dtype)
    q, scale = quantize_int8(w)
    want_q, want_scale = int8_oracle(w.double().numpy())
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    np.testing.assert_allclose(scale.double().numpy(), want_scale, rtol=1e-6)
    got = q.numpy().astype(np.float64)
    # float32 division may land on the other side of a .5 tie than float64 does: only there may they differ (by 1)
    quotient = w.double().numpy() / want_scale[:, None]
    near_tie = np.abs(np.abs(quotient - np.trunc(quotient)) - 0.5) < 1e-4
    assert np.all((got == want_q) | (near_tie & (np.abs(got - want_q) == 1)))
    assert np.abs(got).max() <= 127
    deq = dequantize(q, scale).double().numpy()
    assert np.all(np.abs(deq - w.double().numpy()) <= want_scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (130, 67), (4100, 16)])
def test_fp8_quantization_matches_the_oracle(shape):
    w = weights(*shape, seed=7 + shape[0])
    q, scale = quantize_fp8(w)
    wd = w.double().numpy()
    amax = np.abs(wd).max(axis=1)
    want_scale = np.where(amax > 0, amax / 448.0, 1.0)
    assert q.dtype == torch.float8_e4m3fn
    np.testing.assert_allclose(scale.double().numpy(), want_scale, rtol=1e-6)
    want_q = e4m3_round(wd / scale.double().numpy()[:, None])   # the float32 scale itself, as the code divides by it
    got = q.float().double().numpy()
    # float32 w / scale against float64 may differ at a tie of the grid: allow the neighbouring grid value there
    grid = e4m3_grid()
    step = np.diff(grid)[np.clip(np.searchsorted(grid, np.abs(want_q)) - 1, 0, len(grid) - 2)]
    assert np.all((got == want_q) | (np.abs(got - want_q) <= step * (1 + 1e-9)))
    assert np.abs(got).max() <= 448
    assert (got == want_q).mean() > 0.999
    assert np.abs(got).max() == 448.0 or shape == (1, 1)   # every nonzero channel's largest weight maps to 448


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", [(1, 3), (31, 16), (257, 64), (100, 67)])
@pytest.mark.parametrize("rows", [1, 5, 13, 130])
@pytest.mark.parametrize("strided", [False, True])
def test_int8_linear_matches_the_oracle(dtype, n, k, rows, strided):
    gen = torch.Generator().manual_seed(n * 7 + k + rows)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    x = torch.randn(rows, 2 * k, generator=gen).to(dtype)
    x = x[:, ::2] if strided else x[:, :k].contiguous()
    bias = torch.randn(n, generator=gen).to(dtype) if rows % 2 else None
    y = int8_linear(x, q, scale, bias)
    want = x.double() @ (q.double() * scale.double()[:, None]).t()
    if bias is not None:
        want += bias.double()
    assert y.dtype == dtype and y.shape == (rows, n)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.double() - want).abs().max() / want.abs().max()).item() < tolerance


def test_int8_linear_module_runs_the_checkpoint_weight():
    linear = torch.nn.Linear(67, 45, bias=True)
    x = torch.randn(2, 3, 67)
    y = Int8Linear(linear)(x)
    q, scale = int8_oracle(linear.weight.detach().double().numpy())
    want = x.double() @ torch.from_numpy(q * scale[:, None]).t() + linear.bias.detach().double()
    assert y.shape == (2, 3, 45) and (y.double() - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="torch._scaled_mm on E4M3 needs compute capability >= 8.9")
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_fp8_linear_on_cuda_matches_the_dequantized_oracle(rows):
    linear = torch.nn.Linear(256, 512, bias=True).to("cuda", torch.bfloat16)
    fp8 = Fp8Linear(linear)
    assert fp8.scaled_mm
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    y = fp8(x)
    # oracle: x quantized per row to E4M3 as the op does (numpy grid), times the dequantized weight, in float64
    xd = x.double().cpu().numpy()
    x_scale = np.abs(xd).max(axis=1, keepdims=True) / 448.0
    xq = e4m3_round(xd / x_scale) * x_scale
    wq = fp8.qweight.float().double().cpu().numpy() * fp8.weight_scale.double().cpu().numpy()[:, None]
    want = xq @ wq.T + linear.bias.double().cpu().numpy()
    assert np.abs(y.double().cpu().numpy() - want).max() < 2e-2 * np.abs(want).max()
