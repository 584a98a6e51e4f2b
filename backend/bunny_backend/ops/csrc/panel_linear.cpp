// y = x @ w.T (+ bias) over a weight packed once into column panels: the CPU's linear layers (decoder projections,
// LM head) for every row count, from a decode step's few rows to a prefill's hundreds.
//
// Layout: w [N, K] becomes ceil(N / 32) panels of 32 output features, zero-padded; a panel holds its 32 weights of
// each k contiguously: fp32 [K][32], bf16 [K/2][32][2] (k and k+1 of a feature side by side, the pairs that
// AVX512-BF16's dot product takes). A panel is read front to back once per call, whatever the number of rows, so
// the weight streams from memory at close to the machine's read bandwidth (bench/log/2026-11-27-panels.md: 38-44 GB/s for the
// LM head against oneDNN's 22-28 GB/s at 1-4 rows); each row adds only in-register FMAs, and with many rows a
// panel (128 KB in fp32 at K = 1024) stays in L2 while every row block passes over it, level with oneDNN's GEMM.
//
// Rows are taken 12 at a time against one panel (24 accumulators); from 13 rows on, 6 at a time against two
// panels (24 accumulators, half the weight loads per FMA). Built only where the compiler targets AVX-512
// (-march=native); bf16 also needs AVX512-BF16 (and BW, VL). panel_linear_dtypes() says what this build takes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
// bf16 also stores its outputs as bf16 (16 at a time, masked), which takes AVX512BW and VL besides AVX512-BF16.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define BUNNY_PANEL_BF16 1
#else
#define BUNNY_PANEL_BF16 0
#endif

namespace {

constexpr int64_t kPanel = 32;
// How far ahead each panel's stream is prefetched into L2: with many rows a panel's bytes are consumed slowly
// enough that the hardware prefetcher falls behind (LM head at 10 rows: 22.5 -> 18-19 ms in fp32, 10.6 -> 9.8 in
// bf16; 2 KB and 8 KB ahead did worse).
constexpr int64_t kPrefetchBytes = 4096;

#if defined(__AVX512F__)

// Prefetch the two cache lines of one k-step of each of NP panels, kPrefetchBytes ahead (never faults past the
// end: a prefetch is a hint).
template <int NP, typename T>
inline void prefetch_ahead(const T* at, int64_t panel_stride) {
  for (int p = 0; p < NP; ++p) {
    const char* a = reinterpret_cast<const char*>(at + p * panel_stride) + kPrefetchBytes;
    _mm_prefetch(a, _MM_HINT_T1);
    _mm_prefetch(a + 64, _MM_HINT_T1);
  }
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

template <int C, int NP>
inline void store(__m512 (&acc)[C][2 * NP], float* y, int64_t ldy, int64_t ncols) {
  for (int j = 0; j < 2 * NP; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(y + c * ldy + 16 * j, mask, acc[c][j]);
  }
}

#if BUNNY_PANEL_BF16
// Rounded to nearest even, as torch's float -> bfloat16 conversion: written straight to the bf16 output, with no
// float32 buffer and conversion pass after the call.
template <int C, int NP>
inline void store(__m512 (&acc)[C][2 * NP], uint16_t* y, int64_t ldy, int64_t ncols) {
  for (int j = 0; j < 2 * NP; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    for (int c = 0; c < C; ++c)
      _mm256_mask_storeu_epi16(y + c * ldy + 16 * j, mask, (__m256i)_mm512_cvtneps_pbh(acc[c][j]));
  }
}
#endif

// The accumulators start at the bias (or 0) of their columns.
template <int C, int NP>
inline void init(__m512 (&acc)[C][2 * NP], const float* bias, int64_t ncols) {
  for (int j = 0; j < 2 * NP; ++j) {
    const __m512 b = bias ? _mm512_maskz_loadu_ps(tail_mask(ncols - 16 * j), bias + 16 * j) : _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) acc[c][j] = b;
  }
}

// C rows of x against NP consecutive panels starting at w (each panel K * 32 values); bias: this block's columns;
// y: the output in the weights' dtype.
template <int C, int NP>
void kernel(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t ldy, int64_t ncols) {
  __m512 acc[C][2 * NP];
  init<C, NP>(acc, bias, ncols);
  for (int64_t k = 0; k < K; ++k) {
    prefetch_ahead<NP>(w + k * kPanel, K * kPanel);
    __m512 wv[2 * NP];
    for (int p = 0; p < NP; ++p)
      for (int h = 0; h < 2; ++h) wv[2 * p + h] = _mm512_loadu_ps(w + p * K * kPanel + k * kPanel + 16 * h);
    for (int c = 0; c < C; ++c) {
      const __m512 xb = _mm512_set1_ps(x[c * K + k]);
      for (int j = 0; j < 2 * NP; ++j) acc[c][j] = _mm512_fmadd_ps(xb, wv[j], acc[c][j]);
    }
  }
  store<C, NP>(acc, y, ldy, ncols);
}

#if BUNNY_PANEL_BF16
template <int C, int NP>
void kernel(const uint16_t* x, int64_t K, const uint16_t* w, const float* bias, uint16_t* y, int64_t ldy,
            int64_t ncols) {
  __m512 acc[C][2 * NP];
  init<C, NP>(acc, bias, ncols);
  for (int64_t k = 0; k < K; k += 2) {
    prefetch_ahead<NP>(w + k * kPanel, K * kPanel);
    __m512bh wv[2 * NP];
    for (int p = 0; p < NP; ++p)
      for (int h = 0; h < 2; ++h)
        wv[2 * p + h] = (__m512bh)_mm512_loadu_si512(w + p * K * kPanel + k * kPanel + 32 * h);
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, x + c * K + k, sizeof pair);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 2 * NP; ++j) acc[c][j] = _mm512_dpbf16_ps(acc[c][j], xb, wv[j]);
    }
  }
  store<C, NP>(acc, y, ldy, ncols);
}
#endif

template <typename T>
using KernelFn = void (*)(const T*, int64_t, const T*, const float*, T*, int64_t, int64_t);

// The kernel (the overload for T) for `rows` rows, 1..C.
template <typename T, int NP, int C>
KernelFn<T> pick(int rows) {
  if constexpr (C == 0) {
    return nullptr;
  } else {
    return rows == C ? static_cast<KernelFn<T>>(&kernel<C, NP>) : pick<T, NP, C - 1>(rows);
  }
}

constexpr int kRowsOnePanel = 12;
constexpr int kRowsTwoPanels = 6;

template <typename T>
void run(const T* x, const T* w, const float* bias, T* y, int64_t M, int64_t N, int64_t K, int64_t num_panels) {
  const int NP = M <= kRowsOnePanel ? 1 : 2;
  const int64_t rows_per_block = NP == 1 ? kRowsOnePanel : kRowsTwoPanels;
  const int64_t units = (num_panels + NP - 1) / NP;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u * NP, np = std::min<int64_t>(NP, num_panels - p);
      const int64_t n0 = p * kPanel, ncols = std::min(np * kPanel, N - n0);
      for (int64_t m = 0; m < M; m += rows_per_block) {
        const int rows = static_cast<int>(std::min(rows_per_block, M - m));
        KernelFn<T> fn = np == 2 ? pick<T, 2, kRowsTwoPanels>(rows) : pick<T, 1, kRowsOnePanel>(rows);
        fn(x + m * K, K, w + p * K * kPanel, bias ? bias + n0 : nullptr, y + m * N + n0, N, ncols);
      }
    }
  });
}

#endif  // __AVX512F__

bool takes(at::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#if BUNNY_PANEL_BF16
  if (dtype == at::kBFloat16) return true;
#endif
#endif
  (void)dtype;
  return false;
}

std::string panel_linear_dtypes() {
  std::string out;
  for (auto [dtype, name] : {std::pair{at::kFloat, "float32"}, std::pair{at::kBFloat16, "bfloat16"}})
    if (takes(dtype)) out += (out.empty() ? "" : ",") + std::string(name);
  return out;
}

at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_panels: w must be [out_features, in_features]");
  const std::string taken = panel_linear_dtypes();
  TORCH_CHECK(takes(w.scalar_type()), "pack_panels: this build takes ",
              taken.empty() ? "no dtype (it needs AVX-512)" : taken, ", not ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), np = (N + kPanel - 1) / kPanel, full = N / kPanel, rest = N % kPanel;
  if (w.scalar_type() == at::kFloat) {   // [np][K][32]
    at::Tensor out = at::zeros({np, K, kPanel}, w.options());
    if (full) out.narrow(0, 0, full).copy_(w.narrow(0, 0, full * kPanel).view({full, kPanel, K}).transpose(1, 2));
    if (rest) out.select(0, full).narrow(1, 0, rest).copy_(w.narrow(0, full * kPanel, rest).t());
    return out;
  }
  TORCH_CHECK(K % 2 == 0, "pack_panels: bfloat16 needs an even in_features, got ", K);
  at::Tensor out = at::zeros({np, K / 2, kPanel, 2}, w.options());   // [np][K/2][32][2]
  if (full)
    out.narrow(0, 0, full).copy_(w.narrow(0, 0, full * kPanel).view({full, kPanel, K / 2, 2}).permute({0, 2, 1, 3}));
  if (rest)
    out.select(0, full).narrow(1, 0, rest).copy_(w.narrow(0, full * kPanel, rest).view({rest, K / 2, 2}).permute({1, 0, 2}));
  return out;
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "panel_linear: x must be [rows, in_features]");
  TORCH_CHECK(panels.dim() >= 3 && takes(panels.scalar_type()), "panel_linear: panels must come from pack_panels");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, num_panels = panels.size(0);
  const int64_t packed_k = panels.scalar_type() == at::kFloat ? panels.size(1) : panels.size(1) * 2;
  TORCH_CHECK(packed_k == K, "panel_linear: x has ", K, " features, the panels ", packed_k);
  TORCH_CHECK(N > (num_panels - 1) * kPanel && N <= num_panels * kPanel, "panel_linear: out_features ", N,
              " does not match ", num_panels, " panels");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "panel_linear: bias must be [", N, "]");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options().dtype(panels.scalar_type()));
#if defined(__AVX512F__)
  if (M > 0) {
    if (panels.scalar_type() == at::kFloat) {
      const at::Tensor xc = x.to(at::kFloat).contiguous();
      run<float>(xc.data_ptr<float>(), panels.data_ptr<float>(), bp, y.data_ptr<float>(), M, N, K, num_panels);
    } else {
#if BUNNY_PANEL_BF16
      const at::Tensor xc = x.to(at::kBFloat16).contiguous();
      run<uint16_t>(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()), bp,
                    reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), M, N, K, num_panels);
#endif
    }
  }
#endif
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bunny, m) {
  m.def("panel_linear_dtypes() -> str", &panel_linear_dtypes);
  m.def("pack_panels(Tensor w) -> Tensor");
  m.def("panel_linear(Tensor x, Tensor panels, int out_features, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) {
  m.impl("pack_panels", &pack_panels);
  m.impl("panel_linear", &panel_linear);
}
