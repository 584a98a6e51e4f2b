// Causal attention of one prompt's new rows on the CPU: q [L, H, D] attends over k, v [Lk, Hkv, D], Lk >= L: the
// sequence's first Lk tokens, of which q holds the last L (Lk == L: a fresh prompt; more: a prompt continuing after
// a cached prefix, a chunk of a long one or a prefix-cache hit). Query row i sits at position Lk - L + i and sees
// keys 0..Lk - L + i. Built and loaded by ops/cpu_kernels.py; the portable attention backend calls it for prefills
// (ops/attention_torch.py) where it builds and D is one it was compiled for.
//
// Why: torch's CPU flash attention ran at 65-85 GFLOP/s on these shapes (2.2 ms a layer for a 210-token image
// prompt in bf16, 13 ms at 730 tokens). Here each kv head's keys are converted once to float32 [D][L] and its
// values to [L][D]; then each work item, (query head, block of query rows), runs register-blocked loops: 4 query
// rows x 64 keys of scores per pass over D, a float32 softmax, 4 query rows x D of output per pass over the keys.
// All arithmetic is float32 whatever the input dtype; the output is rounded once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "softmax.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;         // query rows per register block
constexpr int64_t kKeys = 64;        // keys per register block of scores
constexpr int64_t kBlockRows = 32;   // query rows per work item

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// acc[r][j] = sum_d qf[r][d] * kt[d][j] for 4 rows and 64 keys (kt: [D][ld] with the block's keys from column 0).
template <int D>
inline void scores_block(const float (&qf)[kRows][D], const float* kt, int64_t ld, float (&acc)[kRows][kKeys]) {
#if defined(__AVX512F__)
  __m512 a[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; ++d) {
    const float* k = kt + d * ld;
    __m512 k0 = _mm512_loadu_ps(k), k1 = _mm512_loadu_ps(k + 16), k2 = _mm512_loadu_ps(k + 32),
           k3 = _mm512_loadu_ps(k + 48);
    // In registers: else GCC folds each load into the 4 FMAs that use it, 4 loads instead of one, and Zen 4
    // takes one 512-bit load a cycle, so the loop waited on loads (239 tokens: 1.34 -> 1.0 ms, 730: 11.4 -> 7.1).
    asm volatile("" : "+v"(k0), "+v"(k1), "+v"(k2), "+v"(k3));
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(qf[r][d]);
      a[r][0] = _mm512_fmadd_ps(x, k0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(x, k1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(x, k2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(x, k3, a[r][3]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(&acc[r][16 * c], a[r][c]);
#else
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kKeys; ++j) acc[r][j] = 0.f;
  for (int d = 0; d < D; ++d)
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kKeys; ++j) acc[r][j] += qf[r][d] * kt[d * ld + j];
#endif
}

// o[r][d] = sum_j p[r][j] * vf[j][d] over `keys` keys, for 4 rows (p: rows `width` apart).
template <int D>
inline void weighted_values(const float* p, int64_t width, const float* vf, int64_t keys, float (&o)[kRows][D]) {
#if defined(__AVX512F__)
  for (int d0 = 0; d0 < D; d0 += 64) {   // 4 rows x up to 64 columns of the output in registers
    constexpr int kMaxVec = D < 64 ? D / 16 : 4;
    __m512 a[kRows][kMaxVec];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kMaxVec; ++c) a[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < keys; ++j) {
      const float* v = vf + j * D + d0;
      __m512 vv[kMaxVec];
      for (int c = 0; c < kMaxVec; ++c) {
        vv[c] = _mm512_loadu_ps(v + 16 * c);
        asm volatile("" : "+v"(vv[c]));   // in a register, as k0..k3 in scores_block
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 x = _mm512_set1_ps(p[r * width + j]);
        for (int c = 0; c < kMaxVec; ++c) a[r][c] = _mm512_fmadd_ps(x, vv[c], a[r][c]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kMaxVec; ++c) _mm512_storeu_ps(&o[r][d0 + 16 * c], a[r][c]);
  }
#else
  for (int r = 0; r < kRows; ++r)
    for (int d = 0; d < D; ++d) o[r][d] = 0.f;
  for (int64_t j = 0; j < keys; ++j)
    for (int r = 0; r < kRows; ++r)
      for (int d = 0; d < D; ++d) o[r][d] += p[r * width + j] * vf[j * D + d];
#endif
}

// Query rows i0..i1-1 of one head; row i sees keys 0..off+i.
template <int D, typename T>
void attend_block(const T* q, int64_t qs, const float* kt, int64_t ld_kt, const float* vf, int64_t off, int64_t i0,
                  int64_t i1, float scale, float* scores, T* out, int64_t os) {
  const int64_t width = off + i1;   // keys 0..off+i1-1 serve every row of the block
  for (int64_t r0 = i0; r0 < i1; r0 += kRows) {
    const int64_t nr = std::min(kRows, i1 - r0);
    float qf[kRows][D];
    for (int64_t r = 0; r < kRows; ++r)
      for (int d = 0; d < D; ++d) qf[r][d] = r < nr ? to_f(q[(r0 + r) * qs + d]) * scale : 0.f;
    const int64_t keys = off + r0 + nr;   // the last row of these sees keys 0..off+r0+nr-1
    for (int64_t j0 = 0; j0 < keys; j0 += kKeys) {
      float acc[kRows][kKeys];
      scores_block<D>(qf, kt + j0, ld_kt, acc);
      const int64_t nj = std::min(kKeys, keys - j0);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < nj; ++j) scores[r * width + j0 + j] = acc[r][j];
    }
    for (int64_t r = 0; r < nr; ++r) {   // softmax over keys 0..off+i (the rest of the row is masked out)
      float* s = scores + r * width;
      bunny::softmax(s, off + r0 + r + 1);
      std::fill(s + off + r0 + r + 1, s + keys, 0.f);
    }
    for (int64_t r = nr; r < kRows; ++r) std::fill(scores + r * width, scores + r * width + keys, 0.f);
    float o[kRows][D];
    weighted_values<D>(scores, width, vf, keys, o);
    for (int64_t r = 0; r < nr; ++r)
      for (int d = 0; d < D; ++d) out[(r0 + r) * os + d] = static_cast<T>(o[r][d]);
  }
}

// The float32 K/V copies, kept with the calling thread between calls: fresh multi-MB buffers were new pages every
// call (239 tokens x 16 heads bf16: 2.76 -> 1.41-1.61 ms with them kept). One over kKeepFloats (a long prompt's)
// is freed after its call.
struct ScratchBuffers {
  static constexpr size_t kKeepFloats = size_t(16) << 20;   // 64 MiB each

  static float* get(int which, int64_t n) {
    std::vector<float>& b = buffers()[which];
    if (b.size() < static_cast<size_t>(n)) b.resize(n);
    return b.data();
  }
  static void trim() {
    for (std::vector<float>& b : buffers())
      if (b.capacity() > kKeepFloats) std::vector<float>().swap(b);
  }

 private:
  static std::vector<float> (&buffers())[2] {
    static thread_local std::vector<float> b[2];
    return b;
  }
};

template <int D, typename T>
void causal_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out) {
  const int64_t L = q.size(0), Lk = k.size(0), off = Lk - L, H = q.size(1), Hkv = k.size(1), G = H / Hkv;
  const int64_t blocks = (L + kBlockRows - 1) / kBlockRows;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0), os = out.stride(0);
  // Keys as float32 [Hkv][D][ld] (transposed: a pass over D reads 64 keys' scores at once) and values as float32
  // [Hkv][Lk][D], once for every query head and block that reads them.
  // Key columns past Lk are read, never used: zeroed.
  const int64_t ld = (Lk + kKeys - 1) / kKeys * kKeys;
  float* const kt = ScratchBuffers::get(0, Hkv * D * ld);   // the caller's: the lambdas below run on other threads
  float* const vf = ScratchBuffers::get(1, Hkv * Lk * D);
  at::parallel_for(0, Hkv, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int d = 0; d < D; ++d) std::fill(kt + (g * D + d) * ld + Lk, kt + (g * D + d + 1) * ld, 0.f);
      for (int64_t j = 0; j < Lk; ++j) {
        const T* kr = kp + j * ks + g * D;
        const T* vr = vp + j * vs + g * D;
        for (int d = 0; d < D; ++d) {
          kt[(g * D + d) * ld + j] = to_f(kr[d]);
          vf[(g * Lk + j) * D + d] = to_f(vr[d]);
        }
      }
    }
  });
  // Items taken from a shared counter in order of decreasing work (late query blocks see more keys), so the
  // threads finish together.
  const int64_t items = H * blocks;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    std::vector<float> scores(kRows * Lk);
    for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t b = blocks - 1 - item / H, h = item % H, g = h / G;
      const int64_t i0 = b * kBlockRows, i1 = std::min(L, i0 + kBlockRows);
      attend_block<D, T>(qp + h * D, qs, kt + g * D * ld, ld, vf + g * Lk * D, off, i0, i1,
                         static_cast<float>(scale), scores.data(), op + h * D, os);
    }
  });
  ScratchBuffers::trim();
}

constexpr int64_t kHeadDims[] = {16, 32, 64, 128};   // the D the switch below instantiates

template <typename T>
void dispatch_d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 16: return causal_impl<16, T>(q, k, v, scale, out);
    case 32: return causal_impl<32, T>(q, k, v, scale, out);
    case 64: return causal_impl<64, T>(q, k, v, scale, out);
    case 128: return causal_impl<128, T>(q, k, v, scale, out);
  }
}

std::string causal_attention_head_dims() {
  std::string out;
  for (int64_t d : kHeadDims) out += (out.empty() ? "" : ",") + std::to_string(d);
  return out;
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "causal_attention: q, k and v must be [L, heads, D]");
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) >= L && k.size(2) == D, "causal_attention: k and v must be [Lk, ",
              "Hkv, ", D, "] with Lk >= ", L, " (q's rows), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "causal_attention: ", H, " query heads are not a multiple of ", Hkv,
              " kv heads");
  TORCH_CHECK(std::find(std::begin(kHeadDims), std::end(kHeadDims), D) != std::end(kHeadDims),
              "causal_attention: head_dim ", D, " is not one of ", causal_attention_head_dims());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "causal_attention: q, k and v must all be float32 or all bfloat16");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "causal_attention: each row's heads must be contiguous");
  at::Tensor out = at::empty({L, H, D}, q.options());
  if (L == 0) return out;
  if (q.scalar_type() == at::kFloat) dispatch_d<float>(q, k, v, scale, out);
  else dispatch_d<at::BFloat16>(q, k, v, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bunny, m) {
  m.def("causal_attention_head_dims() -> str", &causal_attention_head_dims);
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) { m.impl("causal_attention", &causal_attention); }
