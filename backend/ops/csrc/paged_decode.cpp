// Paged decode attention on the CPU: one query row per sequence attends over its first context_lens[b] cached
// tokens, read in place through its block table (no gather). Cache layout as the portable backend's:
// [num_blocks, block_size, Hkv, D] per layer for K and for V. Built and loaded by ops/cpu_kernels.py.
//
// Compiled with -O3 -ffast-math -march=native: fast-math lets the compiler reorder the float sums of the dot
// products and softmax (so they vectorise) and call the vector expf; accumulation is float32 whatever the dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "softmax.h"

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
inline void add_scaled(float* acc, float a, const T* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += a * static_cast<float>(v[i]);
}

// Asks for the rows of a block's first n tokens (span bytes each, token_stride elements apart) to be brought into
// the cache. Blocks sit anywhere in the cache, and an item reads only its heads' part of each row, so the hardware
// prefetcher cannot run ahead: without this, decode attention waited on memory latency, not bandwidth (cold
// caches, 4 sequences of 300 tokens: 555 us a layer, at 9 GB/s).
template <typename T>
inline void prefetch_block(const T* first, int64_t n, int64_t token_stride, int64_t span) {
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(first + i * token_stride);
    for (int64_t b = 0; b < span; b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// q: [B, H, D] float32; out: [B, H, D] float32, written here.
template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const int32_t* lens, int64_t max_len, double scale,
                       at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = Hkv * D, block_stride = block_size * token_stride;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);

  // Work item = (sequence, a run of kv heads). Per token the item reads its heads' rows as one contiguous span:
  // walking one head alone would touch a new page every token (rows Hkv * D apart), which defeats the hardware
  // prefetcher; at large batches a run is all heads. Enough items for every thread to get a few.
  const int64_t runs = std::min(Hkv, (4 * at::get_num_threads() + B - 1) / B);
  const int64_t run = (Hkv + runs - 1) / runs;
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(run * G * max_len);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / runs, h0 = item % runs * run, len = lens[b];
      const int64_t nq = (std::min(h0 + run, Hkv) - h0) * G;   // query heads j = 0..nq-1 read kv head h0 + j / G
      const int32_t* table = tables + b * max_blocks;
      const float* qb = qp + (b * H + h0 * G) * D;
      float* ob = op + (b * H + h0 * G) * D;
      const int64_t span = nq / G * D * static_cast<int64_t>(sizeof(T));   // bytes of a row this item reads
      // the block that starts at token t1 (if any) of cache c, asked for while the one before it is read
      auto prefetch_next = [&](const T* c, int64_t t1) {
        if (t1 < len)
          prefetch_block(c + table[t1 / block_size] * block_stride + h0 * D, std::min(block_size, len - t1),
                         token_stride, span);
      };
      prefetch_next(kp, 0);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {   // scores, one block at a time
        const T* k = kp + table[t0 / block_size] * block_stride + h0 * D;
        const int64_t n = std::min(block_size, len - t0);
        prefetch_next(kp, t0 + block_size);
        if (t0 + block_size >= len) prefetch_next(vp, 0);
        for (int64_t i = 0; i < n; ++i, k += token_stride)
          for (int64_t j = 0; j < nq; ++j) scores[j * len + t0 + i] = dot(qb + j * D, k + j / G * D, D) * sc;
      }
      for (int64_t j = 0; j < nq; ++j) bunny::softmax(&scores[j * len], len);
      std::fill(ob, ob + nq * D, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {   // weighted sum of V, same walk
        const T* v = vp + table[t0 / block_size] * block_stride + h0 * D;
        const int64_t n = std::min(block_size, len - t0);
        prefetch_next(vp, t0 + block_size);
        for (int64_t i = 0; i < n; ++i, v += token_stride)
          for (int64_t j = 0; j < nq; ++j) add_scaled(ob + j * D, scores[j * len + t0 + i], v + j / G * D, D);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode: k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the caches must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "paged_decode: head_dim of q (", D, ") and cache (", k_cache.size(3), ") differ");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "paged_decode: ", H, " query heads are not a multiple of ", Hkv, " kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && context_lens.numel() == B,
              "paged_decode: block_tables must be [B, max_blocks] and context_lens [B] for B = ", B);
  const at::Tensor tables = block_tables.to(at::kInt).contiguous();
  const at::Tensor lens_t = context_lens.to(at::kInt).contiguous();
  const int32_t* lens = lens_t.data_ptr<int32_t>();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int64_t max_blocks = tables.size(1);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "paged_decode: sequence ", b,
                " has context length ", lens[b], ", outside 1..", max_blocks * block_size);
    for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tp[b * max_blocks + j] >= 0 && tp[b * max_blocks + j] < num_blocks, "paged_decode: sequence ",
                  b, " block ", j, " is ", tp[b * max_blocks + j], ", outside the cache's ", num_blocks, " blocks");
    max_len = std::max<int64_t>(max_len, lens[b]);
  }
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, H, D}, qf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode", [&] {
    paged_decode_impl<scalar_t>(qf, k_cache, v_cache, tables, lens, max_len, scale, out);
  });
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(bunny, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bunny, CPU, m) { m.impl("paged_decode", &paged_decode); }
