// y = (x @ q.T) * scale (+ bias) over int8 weights (one float32 scale per output feature) with AVX512-VNNI's
// u8 x s8 dot product (vpdpbusd: four byte products summed into each int32 lane), issue #30.
//
// The activations are quantized per row at call time, asymmetric u8 (vpdpbusd takes unsigned activations): over
// the row's range [lo, hi] widened to hold 0, inv = 255 / (hi - lo), zp = round(-lo * inv), u = clamp(round(x *
// inv) + zp, 0, 255), all in float32, rounding to nearest even; x ~ (u - zp) * x_scale with x_scale = (hi - lo) /
// 255. Then sum_k x_k q[n, k] ~ x_scale * (acc - zp * wsum[n]), acc = sum_k u_k q[n, k] and wsum[n] = sum_k q[n, k]
// (computed once, at packing), both exact in int32 (|acc| <= 255 * 127 * K); y = that * scale[n] + bias[n] in
// float32, written in x's dtype. (Symmetric int8 with a +128 shift gave 10% more logit error on the test model:
// asymmetric uses all 256 levels where a row's range is lopsided.)
//
// activation_bits 16 (quantization int8: weight-only accuracy, since 16 bits over a row's range round finer than
// the bf16 activations themselves): the same with 65535 levels, u = 256 * hi + lo split into two u8 planes, each
// multiplied as above (two vpdpbusd per weight load), zp likewise split; sum_k x_k q[n, k] ~ x_scale * (256 *
// (acc_hi - zp_hi * wsum) + (acc_lo - zp_lo * wsum)), each difference exact in int32, combined in float32.
//
// Layout: q [N, K] becomes ceil(N / 32) panels of 32 output features, zero-padded, each holding [K4][32][4] int8
// (K4 = ceil(K / 4)): the four consecutive k of one feature in one 32-bit lane, as vpdpbusd takes them; a padded k
// has weight 0. A panel is read front to back once per block of up to 12 rows, so
// one k-step of 12 rows is 24 vpdpbusd over 128 weight bytes, where the widening kernel (int8_panel_linear.cpp)
// does 96 FMAs for the same bytes. Built only where the compiler targets AVX512-VNNI, BW and VL
// (-march=native); int8_vnni_linear_available() says whether this build has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define BUNNY_VNNI 1
#include <immintrin.h>
#else
#define BUNNY_VNNI 0
#endif
#if BUNNY_VNNI && defined(__AVX512BF16__)
#define BUNNY_VNNI_BF16_OUT 1
#else
#define BUNNY_VNNI_BF16_OUT 0
#endif

namespace {

constexpr int64_t kPanel = 32;
constexpr int64_t kStep = kPanel * 4;        // weight bytes of one k-step (4 k) of a panel: two cache lines
constexpr int64_t kPrefetchBytes = 2048;     // 16 k-steps ahead
constexpr int kRows = 12;                  // rows per block at 8 bits; 6 at 16 bits (4 accumulators a row)

#if BUNNY_VNNI

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

inline void store(__m512 v, float* y, __mmask16 mask) { _mm512_mask_storeu_ps(y, mask, v); }
#if BUNNY_VNNI_BF16_OUT
inline void store(__m512 v, at::BFloat16* y, __mmask16 mask) {   // rounded to nearest even, as torch's cast
  _mm256_mask_storeu_epi16(y, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// One row of x (float32, K values) -> P planes of K4 * 4 u8 each (plane stride 4 * K4; P = 1: u, P = 2: u's high
// and low bytes; padded with zp's), its scale and per-plane zero points.
template <int P>
void quantize_row(const float* x, int64_t K, int64_t K4, uint8_t* out, float* x_scale, int32_t* zero_point) {
  constexpr float kLevels = P == 1 ? 255.0f : 65535.0f;
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();   // masked-off lanes load 0: the range holds 0
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(tail_mask(K - k), x + k);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
  }
  const float range = _mm512_reduce_max_ps(hi) - _mm512_reduce_min_ps(lo);
  const float inv = range > 0 ? kLevels / range : 0.0f;
  const int32_t zp = static_cast<int32_t>(std::nearbyint(-_mm512_reduce_min_ps(lo) * inv));
  *x_scale = range / kLevels;
  const int32_t zps[2] = {P == 1 ? zp : zp >> 8, zp & 255};
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i vzp = _mm512_set1_epi32(zp), zero = _mm512_setzero_si512();
  const __m512i top = _mm512_set1_epi32(static_cast<int32_t>(kLevels)), low_byte = _mm512_set1_epi32(255);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + k), vinv));   // nearest even
    const __m512i u = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, vzp), zero), top);
    if constexpr (P == 1) {
      _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(u));
    } else {
      _mm_mask_storeu_epi8(out + k, mask, _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
      _mm_mask_storeu_epi8(out + 4 * K4 + k, mask, _mm512_cvtepi32_epi8(_mm512_and_si512(u, low_byte)));
    }
  }
  for (int p = 0; p < P; ++p) {
    zero_point[p] = zps[p];
    for (int64_t k = K; k < 4 * K4; ++k) out[p * 4 * K4 + k] = static_cast<uint8_t>(zps[p]);
  }
}

// C quantized rows of P planes (u8, row stride lda bytes, plane stride 4 * K4; x_scale, zp (P a row): theirs)
// against one panel w ([K4][32][4] int8); wsum, scale, bias: this panel's columns (wsum padded to 32; scale and bias
// read for ncols only); y: the output (row stride ldy).
template <int P, int C, typename Out>
void kernel(const uint8_t* x, int64_t lda, int64_t K4, const int8_t* w, const int32_t* wsum, const float* x_scale,
            const int32_t* zp, const float* scale, const float* bias, Out* y, int64_t ldy, int64_t ncols) {
  __m512i acc[C][P][2];
  for (int c = 0; c < C; ++c)
    for (int p = 0; p < P; ++p) acc[c][p][0] = acc[c][p][1] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* wk = w + k * kStep;
    _mm_prefetch(reinterpret_cast<const char*>(wk) + kPrefetchBytes, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(wk) + kPrefetchBytes + 64, _MM_HINT_T1);
    const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);
    for (int c = 0; c < C; ++c) {
      for (int p = 0; p < P; ++p) {
        int32_t four;
        std::memcpy(&four, x + c * lda + p * 4 * K4 + 4 * k, sizeof four);
        const __m512i xb = _mm512_set1_epi32(four);
        acc[c][p][0] = _mm512_dpbusd_epi32(acc[c][p][0], xb, w0);
        acc[c][p][1] = _mm512_dpbusd_epi32(acc[c][p][1], xb, w1);
      }
    }
  }
  for (int j = 0; j < 2; ++j) {
    const __mmask16 mask = tail_mask(ncols - 16 * j);
    const __m512i cj = _mm512_loadu_si512(wsum + 16 * j);
    const __m512 sj = _mm512_maskz_loadu_ps(mask, scale + 16 * j);
    const __m512 bj = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
    for (int c = 0; c < C; ++c) {
      __m512 sum = _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) {   // high plane first: sum = sum * 256 + plane
        const __m512i shift = _mm512_mullo_epi32(cj, _mm512_set1_epi32(zp[c * P + p]));
        sum = _mm512_fmadd_ps(sum, _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[c][p][j], shift)));
      }
      store(_mm512_fmadd_ps(sum, _mm512_mul_ps(sj, _mm512_set1_ps(x_scale[c])), bj), y + c * ldy + 16 * j, mask);
    }
  }
}

template <typename Out>
using KernelFn = void (*)(const uint8_t*, int64_t, int64_t, const int8_t*, const int32_t*, const float*,
                          const int32_t*, const float*, const float*, Out*, int64_t, int64_t);

template <int P, typename Out, int C>
KernelFn<Out> pick(int rows) {
  if constexpr (C == 0) {
    return nullptr;
  } else {
    return rows == C ? &kernel<P, C, Out> : pick<P, Out, C - 1>(rows);
  }
}

template <int P, typename Out>
void run(const uint8_t* xq, const float* xs, const int32_t* zp, int64_t K4, const int8_t* w, const int32_t* wsum,
         const float* scale, const float* bias, Out* y, int64_t M, int64_t N, int64_t num_panels) {
  constexpr int kBlock = kRows / P;
  const int64_t lda = P * 4 * K4;
  at::parallel_for(0, num_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
      for (int64_t m = 0; m < M; m += kBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kBlock, M - m));
        pick<P, Out, kBlock>(rows)(xq + m * lda, lda, K4, w + p * K4 * kStep, wsum + n0, xs + m, zp + m * P,
                                   scale + n0, bias ? bias + n0 : nullptr, y + m * N + n0, N, ncols);
      }
    }
  });
}

template <int P>
void quantize_and_run(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& wsum, const at::Tensor& scale,
                      const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), num_panels = panels.size(0), K4 = panels.size(1);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq = at::empty({M, P * 4 * K4}, x.options().dtype(at::kByte)), xs = at::empty({M}, scale.options());
  at::Tensor zp = at::empty({M, P}, wsum.options());
  const float* xp = xf.data_ptr<float>();
  uint8_t* xqp = xq.data_ptr<uint8_t>();
  float* xsp = xs.data_ptr<float>();
  int32_t* zpp = zp.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row<P>(xp + m * K, K, K4, xqp + m * P * 4 * K4, xsp + m, zpp + m * P);
  });
  const int8_t* wp = panels.data_ptr<int8_t>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (y.scalar_type() == at::kFloat)
    run<P, float>(xqp, xsp, zpp, K4, wp, wsum.data_ptr<int32_t>(), scale.data_ptr<float>(), bp, y.data_ptr<float>(),
                  M, N, num_panels);
#if BUNNY_VNNI_BF16_OUT
  else
    run<P, at::BFloat16>(xqp, xsp, zpp, K4, wp, wsum.data_ptr<int32_t>(), scale.data_ptr<float>(), bp,
                         y.data_ptr<at::BFloat16>(), M, N, num_panels);
#endif
}

#endif  // BUNNY_VNNI

bool int8_vnni_linear_available() { return BUNNY_VNNI; }

// q int8 [N, K] -> (panels [ceil(N / 32)][K4][32][4] int8, zero-padded; wsum int32 [ceil(N / 32) * 32]:
// sum_k q[n, k], 0 for the padded features).
std::tuple<at::Tensor, at::Tensor> pack_int8_vnni(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar,
              "pack_int8_vnni: q must be int8 [out_features, in_features]");
  const int64_t N = q.size(0), K = q.size(1), np = (N + kPanel - 1) / kPanel, K4 = (K + 3) / 4;
  at::Tensor padded = at::zeros({np * kPanel, K4 * 4}, q.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(q);
  at::Tensor panels = padded.view({np, kPanel, K4, 4}).permute({0, 2, 1, 3}).contiguous();
  return {panels, padded.sum(1, false, at::kInt)};
}

at::Tensor int8_vnni_linear(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& wsum,
                            const at::Tensor& scale, int64_t out_features, const c10::optional<at::Tensor>& bias,
                            int64_t activation_bits) {
  TORCH_CHECK(x.dim() == 2, "int8_vnni_linear: x must be [rows, in_features]");
  TORCH_CHECK(panels.dim() == 4 && panels.scalar_type() == at::kChar && panels.size(2) == kPanel &&
                  panels.size(3) == 4,
              "int8_vnni_linear: panels must come from pack_int8_vnni");
  const int64_t M = x.size(0), K = x.size(1), N = out_features, num_panels = panels.size(0), K4 = panels.size(1);
  TORCH_CHECK((K + 3) / 4 == K4, "int8_vnni_linear: x has ", K, " features, the panels ", 4 * K4 - 3, "..", 4 * K4);
  TORCH_CHECK(K <= 65536, "int8_vnni_linear: in_features ", K, " is over 65536, past int32's exact sums");
  TORCH_CHECK(N > (num_panels - 1) * kPanel && N <= num_panels * kPanel, "int8_vnni_linear: out_features ", N,
              " does not match ", num_panels, " panels");
  TORCH_CHECK(wsum.dim() == 1 && wsum.scalar_type() == at::kInt && wsum.size(0) == num_panels * kPanel,
              "int8_vnni_linear: wsum must come from pack_int8_vnni with the panels");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "int8_vnni_linear: scale must be [", N, "]");
  TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->dim() == 1 && bias->size(0) == N),
              "int8_vnni_linear: bias must be [", N, "]");
  TORCH_CHECK(activation_bits == 8 || activation_bits == 16, "int8_vnni_linear: activation_bits must be 8 or 16, got ",
              activation_bits);
  TORCH_CHECK(int8_vnni_linear_available(), "int8_vnni_linear: this build has no AVX512-VNNI");
  const bool bf16_out = BUNNY_VNNI_BF16_OUT && x.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
#if BUNNY_VNNI
  if (M > 0) {
    const at::Tensor s = scale.to(at::kFloat).contiguous(), ws = wsum.contiguous();
    at::Tensor b;
    if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
    if (activation_bits == 8)
      quantize_and_run<1>(x, panels, ws, s, b, y);
    else
      quantize_and_run<2>(x, panels, ws, s, b, y);
  }
#endif
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bunny, m) {
  m.def("int8_vnni_linear_available() -> bool", &int8_vnni_linear_available);
  m.def("pack_int8_vnni(Tensor q) -> (Tensor, Tensor)");
  m.def("int8_vnni_linear(Tensor x, Tensor panels, Tensor wsum, Tensor scale, int out_features, "
        "Tensor? bias=None, int activation_bits=8) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) {
  m.impl("pack_int8_vnni", &pack_int8_vnni);
  m.impl("int8_vnni_linear", &int8_vnni_linear);
}
