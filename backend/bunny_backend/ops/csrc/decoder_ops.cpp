// The decoder's elementwise work, fused: RMSNorm (alone and after the residual add), rotary embedding of q and k
// straight out of the fused qkv projection, and SiLU(gate) * up. Each replaces 4-12 ATen ops and their
// temporaries per call. Also the greedy sampler's argmax over the logits. Built and loaded by ops/cpu_kernels.py.
//
// Results are those of the PyTorch code they replace (model/layers.py, model/qwen2.py), rounding included: where
// that code rounds an intermediate to bfloat16 (the residual sum, the normalised row before the weight, x * cos,
// silu(gate)), so does this. Only the order of the RMSNorm's float32 sum of squares differs. Plain loops: the
// compiler vectorises them for this machine (-O3 -march=native), so they build on any CPU with a C++ compiler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 15;   // below this many elements per task a thread costs more than it saves

// bfloat16 <-> float32 as plain integer ops (they vectorise); round to nearest even like c10::BFloat16.
inline float widen(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t narrow(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);   // NaN stays NaN
}

inline uint32_t is_nan(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x7fffffffu) > 0x7f800000u;
}

// Element access for the two storage types: float passes through, bfloat16 goes through its bits.
struct F32 {
  using T = float;
  static float load(const T* p, int64_t i) { return p[i]; }
  static void store(T* p, int64_t i, float v) { p[i] = v; }
  static float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static float load(const T* p, int64_t i) { return widen(p[i]); }
  static void store(T* p, int64_t i, float v) { p[i] = narrow(v); }
  static float round(float v) { return widen(narrow(v)); }
};

template <typename S>
const typename S::T* in(const at::Tensor& t) { return reinterpret_cast<const typename S::T*>(t.const_data_ptr()); }

template <typename S>
typename S::T* out(at::Tensor& t) { return reinterpret_cast<typename S::T*>(t.mutable_data_ptr()); }

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)); }

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2, what, ": expects a 2-D tensor [rows, features], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.stride(1) == 1, what, ": the feature dimension must be contiguous");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
              ": takes float32 or bfloat16, got ", x.scalar_type());
}

// One row: y = w * round(x * rsqrt(mean(x^2) + eps)), the sum of squares and the scaling in float32.
template <typename S>
void norm_row(const float* x, const typename S::T* w, int64_t n, float eps, typename S::T* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) S::store(y, i, S::load(w, i) * S::round(x[i] * r));
}

// With residual: s = round(x + residual) is the new residual stream, y = rmsnorm(s).
template <typename S>
void rms_norm_impl(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& w, double eps,
                   at::Tensor& y, at::Tensor* sum) {
  const int64_t rows = x.size(0), n = x.size(1);
  const auto* xp = in<S>(x);
  const auto* rp = residual ? in<S>(*residual) : nullptr;
  const auto* wp = in<S>(w);
  auto* yp = out<S>(y);
  auto* sp = sum ? out<S>(*sum) : nullptr;
  const int64_t xs = x.stride(0), rs = residual ? residual->stride(0) : 0;
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const auto* xr = xp + r * xs;
      if (rp) {
        const auto* rr = rp + r * rs;
        for (int64_t i = 0; i < n; ++i) {
          row[i] = S::round(S::load(xr, i) + S::load(rr, i));
          S::store(sp + r * n, i, row[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) row[i] = S::load(xr, i);
      }
      norm_row<S>(row.data(), wp, n, static_cast<float>(eps), yp + r * n);
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& w, const char* what) {
  check_rows(x, what);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), what, ": weight must be contiguous [",
              x.size(1), "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), what, ": weight is ", w.scalar_type(), " but x is ",
              x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_norm(x, w, "rms_norm");
  auto y = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) rms_norm_impl<F32>(x, nullptr, w, eps, y, nullptr);
  else rms_norm_impl<BF16>(x, nullptr, w, eps, y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& w, double eps) {
  check_norm(x, w, "add_rms_norm");
  check_rows(residual, "add_rms_norm");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x (", x.sizes(), " ", x.scalar_type(), "), got ", residual.sizes(),
              " ", residual.scalar_type());
  auto y = at::empty(x.sizes(), x.options());
  auto s = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) rms_norm_impl<F32>(x, &residual, w, eps, y, &s);
  else rms_norm_impl<BF16>(x, &residual, w, eps, y, &s);
  return {y, s};
}

// Rotate-half rotary on `heads` heads of D starting at column `col` of each qkv row, into a contiguous
// [rows, heads, D]: y[i] = round(x[i] cos[i]) + round(-x[i+D/2] sin[i]), y[i+D/2] = round(x[i+D/2] cos[i+D/2]) +
// round(x[i] sin[i+D/2]).
template <typename S>
void rotate(const at::Tensor& qkv, int64_t col, int64_t heads, int64_t D, const at::Tensor& cos,
            const at::Tensor& sin, at::Tensor& y) {
  const int64_t rows = qkv.size(0), half = D / 2, xs = qkv.stride(0);
  const auto* xp = in<S>(qkv) + col;
  const auto* cp = in<S>(cos);
  const auto* sp = in<S>(sin);
  auto* yp = out<S>(y);
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, rows, grain_rows(heads * D), [&](int64_t begin, int64_t end) {
    std::vector<float> cf(D), sf(D);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < D; ++i) {
        cf[i] = S::load(cp + r * cs, i);
        sf[i] = S::load(sp + r * ss, i);
      }
      const float* __restrict__ c = cf.data();
      const float* __restrict__ s = sf.data();
      for (int64_t h = 0; h < heads; ++h) {
        const auto* __restrict__ x = xp + r * xs + h * D;
        auto* __restrict__ o = yp + (r * heads + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = S::load(x, i), x2 = S::load(x, i + half);
          S::store(o, i, S::round(x1 * c[i]) + S::round(-x2 * s[i]));
        }
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = S::load(x, i), x2 = S::load(x, i + half);
          S::store(o, i + half, S::round(x2 * c[i + half]) + S::round(x1 * s[i + half]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotary_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "rotary_qk");
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "rotary_qk: head_dim must be even and positive, got ", head_dim);
  TORCH_CHECK(qkv.size(1) >= (num_heads + 2 * num_kv_heads) * head_dim, "rotary_qk: qkv has ", qkv.size(1),
              " features, fewer than q, k and v need (", (num_heads + 2 * num_kv_heads) * head_dim, ")");
  for (const auto* t : {&cos, &sin}) {
    check_rows(*t, "rotary_qk");
    TORCH_CHECK(t->size(0) == qkv.size(0) && t->size(1) == head_dim && t->scalar_type() == qkv.scalar_type(),
                "rotary_qk: cos and sin must be [", qkv.size(0), ", ", head_dim, "] ", qkv.scalar_type(), ", got ",
                t->sizes(), " ", t->scalar_type());
  }
  auto q = at::empty({qkv.size(0), num_heads, head_dim}, qkv.options());
  auto k = at::empty({qkv.size(0), num_kv_heads, head_dim}, qkv.options());
  const bool f32 = qkv.scalar_type() == at::kFloat;
  for (auto [col, heads, y] : {std::tuple<int64_t, int64_t, at::Tensor*>{0, num_heads, &q},
                               {num_heads * head_dim, num_kv_heads, &k}}) {
    if (f32) rotate<F32>(qkv, col, heads, head_dim, cos, sin, *y);
    else rotate<BF16>(qkv, col, heads, head_dim, cos, sin, *y);
  }
  return {q, k};
}

// gate_up [rows, 2I] -> round(round(silu(gate)) * up) [rows, I].
template <typename S>
void silu_mul_impl(const at::Tensor& gu, at::Tensor& y) {
  const int64_t rows = gu.size(0), n = y.size(1), xs = gu.stride(0);
  const auto* gp = in<S>(gu);
  auto* yp = out<S>(y);
  at::parallel_for(0, rows, grain_rows(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto* g = gp + r * xs;
      const auto* u = g + n;
      auto* o = yp + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const float a = S::load(g, i);
        S::store(o, i, S::round(a / (1.f + std::exp(-a))) * S::load(u, i));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up must have an even number of features, got ",
              gate_up.size(1));
  auto y = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) silu_mul_impl<F32>(gate_up, y);
  else silu_mul_impl<BF16>(gate_up, y);
  return y;
}

// Greedy tokens: the index of each row's largest value, the first one on ties, a NaN counting as the largest (as
// torch.argmax). Reads bfloat16 logits as they are: torch's bf16 argmax is ~4x slower than its float32 one, which
// itself runs on one thread.
template <typename S>
void argmax_impl(const at::Tensor& x, int64_t* out) {
  const int64_t rows = x.size(0), n = x.size(1), xs = x.stride(0);
  const auto* xp = in<S>(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 16384));
  const int64_t width = (n + chunks - 1) / chunks;
  std::vector<float> best(rows * chunks);
  std::vector<int64_t> where(rows * chunks);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks, i0 = item % chunks * width, i1 = std::min(n, i0 + width);
      const auto* row = xp + r * xs;
      // Two passes that vectorise: the largest value and whether a NaN is there, then the first index holding it.
      // (NaN is tested on the bits: -ffast-math lets the compiler assume there is none.)
      float m = -INFINITY;
      uint32_t nan = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const float v = S::load(row, i);
        m = v > m ? v : m;
        nan |= is_nan(v);
      }
      int64_t at = i0;
      if (nan) {
        while (!is_nan(S::load(row, at))) ++at;
        m = NAN;
      } else {
        while (at < i1 - 1 && S::load(row, at) != m) ++at;
      }
      best[item] = m;
      where[item] = at;
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    int64_t c = r * chunks;
    for (int64_t j = c + 1; j < (r + 1) * chunks && !is_nan(best[c]); ++j)
      if (best[j] > best[c] || is_nan(best[j])) c = j;
    out[r] = where[c];
  }
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  check_rows(logits, "argmax_rows");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: rows must not be empty");
  auto out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  if (logits.scalar_type() == at::kFloat) argmax_impl<F32>(logits, out.data_ptr<int64_t>());
  else argmax_impl<BF16>(logits, out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bunny, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_qk(Tensor qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int head_dim) "
        "-> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_qk", &rotary_qk);
  m.impl("silu_mul", &silu_mul);
  m.impl("argmax_rows", &argmax_rows);
}
