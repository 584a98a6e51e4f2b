// y = (x @ q.T) * scale (+ bias) over int8 weights with one float32 scale per output feature (issue #30), packed
// once into column panels as csrc/panel_linear.cpp packs fp32: ceil(N / 32) panels of 32 output features,
// zero-padded, each holding its 32 weights of each k contiguously ([K][32] int8: 32 bytes a k-step, a quarter of
// fp32's). The int8 weights are widened to float32 in registers (vpmovsxbd + vcvtdq2ps, exact for |q| <= 127) and
// multiplied by the rows of x in float32; each column's scale and bias are applied once, to the accumulators, at the
// end. A panel is read front to back once per block of up to 12 rows, so a decode step streams a quarter of the
// fp32 bytes, half of bf16's. Built only where the compiler targets AVX-512 (-march=native);
// int8_panel_linear_available() says whether this build has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 32;
constexpr int64_t kPrefetchBytes = 1024;   // a quarter of the fp32 kernel's 4 KB: the same number of k-steps ahead
constexpr int kRows = 12;

#if defined(__AVX512F__)

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// C rows of x (float32, row stride K) against one panel w ([K][32] int8); scale/bias: this panel's 32 columns
// (float32, zero-padded); y: the output (row stride ldy), ncols of it written.
template <int C>
void kernel(const float* x, int64_t K, const int8_t* w, const float* scale, const float* bias, float* y,
            int64_t ldy, int64_t ncols) {
  __m512 acc[C][2];
  for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k * kPanel) + kPrefetchBytes, _MM_HINT_T1);
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * kPanel))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * kPanel + 16))));
    for (int c = 0; c < C; ++c) {
      const __m512 xb = _mm512_set1_ps(x[c * K + k]);
      acc[c][0] = _mm512_fmadd_ps(xb, w0, acc[c][0]);
      acc[c][1] = _mm512_fmadd_ps(xb, w1, acc[c][1]);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    const __m512 s = _mm512_loadu_ps(scale + 16 * j);
    const __m512 b = bias ? _mm512_loadu_ps(bias + 16 * j) : _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + c * ldy + 16 * j, mask, _mm512_fmadd_ps(acc[c][j], s, b));
  }
}

using KernelFn = void (*)(const float*, int64_t, const int8_t*, const float*, const float*, float*, int64_t, int64_t);

template <int C>
KernelFn pick(int rows) {
  if constexpr (C == 0) {
    return nullptr;
  } else {
    return rows == C ? &kernel<C> : pick<C - 1>(rows);
  }
}

#endif  // __AVX512F__

bool int8_panel_linear_available() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// q int8 [N, K] -> [ceil(N / 32)][K][32] int8, zero-padded.
at::Tensor pack_int8_panels(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar,
              "pack_int8_panels: q must be int8 [out_features, in_features]");
  const int64_t N = q.size(0), K = q.size(1), np = (N + kPanel - 1) / kPanel, full = N / kPanel, rest = N % kPanel;
  at::Tensor out = at::zeros({np, K, kPanel}, q.options());
  if (full) out.narrow(0, 0, full).copy_(q.narrow(0, 0, full * kPanel).view({full, kPanel, K}).transpose(1, 2));
  if (rest) out.select(0, full).narrow(1, 0, rest).copy_(q.narrow(0, full * kPanel, rest).t());
  return out;
}

// scale [N] float32 and bias [N] (or undefined): float32, zero-padded to the panels' columns (the kernel loads 32
// of each per panel).
at::Tensor padded(const at::Tensor& v, int64_t N, int64_t columns, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == N, "int8_panel_linear: ", what, " must be [", N, "]");
  at::Tensor out = at::zeros({columns}, v.options().dtype(at::kFloat));
  out.narrow(0, 0, N).copy_(v);
  return out;
}

at::Tensor int8_panel_linear(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale,
                             int64_t out_features, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int8_panel_linear: x must be [rows, in_features]");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kChar && panels.size(2) == kPanel,
              "int8_panel_linear: panels must come from pack_int8_panels");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, num_panels = panels.size(0);
  TORCH_CHECK(panels.size(1) == K, "int8_panel_linear: x has ", K, " features, the panels ", panels.size(1));
  TORCH_CHECK(N > (num_panels - 1) * kPanel && N <= num_panels * kPanel, "int8_panel_linear: out_features ", N,
              " does not match ", num_panels, " panels");
  TORCH_CHECK(int8_panel_linear_available(), "int8_panel_linear: this build has no AVX-512");
  const at::Tensor s = padded(scale, N, num_panels * kPanel, "scale");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = padded(*bias, N, num_panels * kPanel, "bias");
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
#if defined(__AVX512F__)
  if (M > 0) {
    const at::Tensor xc = x.to(at::kFloat).contiguous();
    const float* xp = xc.data_ptr<float>();
    const int8_t* wp = panels.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
        for (int64_t m = 0; m < M; m += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m));
          pick<kRows>(rows)(xp + m * K, K, wp + p * K * kPanel, sp + n0, bp ? bp + n0 : nullptr, yp + m * N + n0,
                            N, ncols);
        }
      }
    });
  }
#endif
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bunny, m) {
  m.def("int8_panel_linear_available() -> bool", &int8_panel_linear_available);
  m.def("pack_int8_panels(Tensor q) -> Tensor");
  m.def("int8_panel_linear(Tensor x, Tensor panels, Tensor scale, int out_features, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) {
  m.impl("pack_int8_panels", &pack_int8_panels);
  m.impl("int8_panel_linear", &int8_panel_linear);
}
