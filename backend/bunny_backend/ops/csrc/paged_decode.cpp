// Paged decode attention on the CPU: one query row per sequence attends over its first context_lens[b] cached
// tokens, read in place through its block table (no gather). Cache layout as the portable backend's:
// [num_blocks, block_size, Hkv, D] per layer for K and for V. Built and loaded by ops/cpu_kernels.py.
//
// Compiled with -O3 -ffast-math -march=native: fast-math lets the compiler reorder the float sums of the dot
// products and softmax (so they vectorise) and call the vector expf; accumulation is float32 whatever the dtype.
//
// Two kernels: with AVX-512 and D a multiple of 32, register-blocked loops (16 keys' dot products reduced together,
// the output accumulated 16 keys at a time in registers, the blocks read next asked for kAhead blocks ahead) for
// bfloat16, and for float32 at small batches; else plain loops the compiler vectorises (paged_decode_impl says
// where each was measured faster).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "softmax.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Asks for the rows of a block's first n tokens (span bytes each, token_stride elements apart) to be brought into
// L2 (Locality 2) or L1 (3). Blocks sit anywhere in the cache, so the hardware prefetcher cannot run ahead from one
// block into the next (cold caches, 4 sequences of 300 tokens: 555 us a layer at 9 GB/s without any prefetch).
template <int Locality = 2, typename T>
inline void prefetch_rows(const T* first, int64_t n, int64_t token_stride, int64_t span) {
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(first + i * token_stride);
    for (int64_t b = 0; b < span; b += 64) __builtin_prefetch(row + b, 0, Locality);
  }
}

// The shapes both kernels walk by. Work item = (sequence, a run of kv heads). Per token an item reads its heads'
// rows as one contiguous span: walking one head alone would touch a new page every token (rows Hkv * D apart),
// which defeats the hardware prefetcher; at large batches a run is all heads. Enough items for every thread to
// get a few.
struct Walk {
  int64_t B, H, D, block_size, Hkv, G, max_blocks, token_stride, block_stride, runs, run;

  Walk(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_tables)
      : B(q.size(0)), H(q.size(1)), D(q.size(2)), block_size(k_cache.size(1)), Hkv(k_cache.size(2)), G(H / Hkv),
        max_blocks(block_tables.size(1)), token_stride(Hkv * D), block_stride(block_size * token_stride),
        runs(std::min(Hkv, (4 * at::get_num_threads() + B - 1) / B)), run((Hkv + runs - 1) / runs) {}
};

// How many blocks ahead of the one being read the walk asks for (1, 2, 4 and 8 measured alike; 2 leaves a block's
// time of slack where a thread is preempted).
constexpr int64_t kAhead = 2;

// A block an item reads (its rows at the run's first kv head), or none.
template <typename T>
struct Next {
  const T* rows = nullptr;
  int64_t n = 0;
};

// One work item: a sequence and a run of its kv heads, with the query heads that read them.
template <typename T>
struct Item {
  const float* q;        // [nq, D]: query heads j = 0..nq-1 read kv head j / G of the run
  float* out;            // [nq, D]
  const T* k;            // the caches, offset to the run's first kv head
  const T* v;
  const int32_t* table;  // the sequence's block table
  int64_t len, nq, G, D, block_size, token_stride, block_stride;
  float scale;
  const Item* following = nullptr;   // the item the thread reads after this one

  const T* block(const T* cache, int64_t t0) const { return cache + table[t0 / block_size] * block_stride; }
  int64_t rows_from(int64_t t0) const { return std::min(block_size, len - t0); }
  int64_t blocks() const { return (len + block_size - 1) / block_size; }
  // Block p of the thread's walk from this item: its keys' blocks, its values', then the following item's keys'.
  Next<T> ahead(int64_t p) const {
    const int64_t nb = blocks();
    if (p < 2 * nb) {
      const int64_t t0 = p % nb * block_size;
      return {block(p < nb ? k : v, t0), rows_from(t0)};
    }
    if (following == nullptr || p - 2 * nb >= following->blocks()) return {};
    const int64_t t0 = (p - 2 * nb) * block_size;
    return {following->block(following->k, t0), following->rows_from(t0)};
  }
  int64_t span() const { return nq / G * D * static_cast<int64_t>(sizeof(T)); }   // bytes of a row it reads
};

// ---- the AVX-512 item kernel ----

#if defined(__AVX512F__)
constexpr bool kVectorPath = true;
constexpr int64_t kTile = 16;   // keys per register block

// 32 elements of a row as two float32 vectors. bf16 splits one 64-byte load into its even elements (lo) and odd
// ones (hi), two integer ops; float32 loads 0..15 and 16..31. q and the output use the same lane order (lane()),
// so dot products and accumulation need no shuffles.
template <typename T>
inline void load32(const T* p, __m512& lo, __m512& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  } else {
    const __m512i x = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u))));
  }
}

// which element of a 32-element chunk sits in lane l (0..15 of lo, 16..31 of hi)
template <typename T>
inline int64_t lane(int64_t l) {
  if constexpr (std::is_same_v<T, float>) return l;
  else return l < 16 ? 2 * l : 2 * (l - 16) + 1;
}

// lane k of the result = the sum of p[k]'s 16 lanes
inline __m512 sum16(const __m512 (&p)[kTile]) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * k], p[2 * k + 1]), _mm512_unpackhi_ps(p[2 * k], p[2 * k + 1]));
  for (int k = 0; k < 4; ++k)   // per 128-bit lane: the partial sums of p[4k..4k+3]
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], 0xEE));
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}

// Step h of the h_steps a tile takes asks for its share of the rows of tile i0 of the next block, whole rows in
// order (spread this way, the prefetches cost a few instructions a step and reach memory as one stream).
template <typename T>
inline void prefetch_tile(const Item<T>& it, const Next<T>& next, int64_t i0, int64_t h, int64_t h_steps) {
  const int64_t rows = std::min(kTile, next.n - i0);
  if (rows <= 0) return;
  const int64_t r0 = h * rows / h_steps, r1 = (h + 1) * rows / h_steps;
  prefetch_rows(next.rows + (i0 + r0) * it.token_stride, r1 - r0, it.token_stride, it.span());
}

// 16 keys (a tile) of one query head at a time: their 16 dot products reduced together, their weighted values
// summed in registers. qp: the item's query heads in lane order; scores: [nq, len]; acc: [nq, D] in lane order,
// zeroed by the caller.
template <typename T>
void attend_tiles(const Item<T>& it, const float* qp, float* scores, float* acc) {
  const int64_t len = it.len, nq = it.nq, D = it.D, G = it.G, chunks = D / 32;
  for (int64_t t0 = 0; t0 < len; t0 += it.block_size) {   // scores, one block at a time
    const T* rows = it.block(it.k, t0);
    const int64_t n = it.rows_from(t0);
    const Next<T> next = it.ahead(t0 / it.block_size + kAhead);
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      const int64_t nt = std::min(kTile, n - i0);
      for (int64_t j = 0; j < nq; ++j) {
        if (j % G == 0) prefetch_tile(it, next, i0, j / G, nq / G);
        const T* kj = rows + i0 * it.token_stride + j / G * D;
        const float* qj = qp + j * D;
        __m512 part[kTile];
        for (int64_t i = 0; i < kTile; ++i) part[i] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __m512 qlo = _mm512_loadu_ps(qj + 32 * c), qhi = _mm512_loadu_ps(qj + 32 * c + 16);
          for (int64_t i = 0; i < kTile; ++i) {   // a whole tile, so part[] stays in registers; a short one
            __m512 lo, hi;                         // reads its last key again for the lanes it does not store
            load32(kj + std::min(i, nt - 1) * it.token_stride + 32 * c, lo, hi);
            part[i] = _mm512_fmadd_ps(qhi, hi, _mm512_fmadd_ps(qlo, lo, part[i]));
          }
        }
        const __m512 s = _mm512_mul_ps(sum16(part), _mm512_set1_ps(it.scale));
        _mm512_mask_storeu_ps(scores + j * len + t0 + i0, static_cast<__mmask16>((1u << nt) - 1), s);
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j) bunny::softmax(&scores[j * len], len);
  for (int64_t t0 = 0; t0 < len; t0 += it.block_size) {   // the weighted sum of V, same walk
    const T* rows = it.block(it.v, t0);
    const int64_t n = it.rows_from(t0);
    const Next<T> next = it.ahead(it.blocks() + t0 / it.block_size + kAhead);
    for (int64_t i0 = 0; i0 < n; i0 += kTile) {
      const int64_t nt = std::min(kTile, n - i0);
      for (int64_t j = 0; j < nq; ++j) {
        if (j % G == 0) prefetch_tile(it, next, i0, j / G, nq / G);
        const T* vj = rows + i0 * it.token_stride + j / G * D;
        const float* sj = scores + j * len + t0 + i0;
        float* aj = acc + j * D;
        for (int64_t c = 0; c < chunks; ++c) {
          __m512 alo = _mm512_loadu_ps(aj + 32 * c), ahi = _mm512_loadu_ps(aj + 32 * c + 16);
          for (int64_t i = 0; i < nt; ++i) {
            __m512 lo, hi;
            load32(vj + i * it.token_stride + 32 * c, lo, hi);
            const __m512 p = _mm512_set1_ps(sj[i]);
            alo = _mm512_fmadd_ps(p, lo, alo);
            ahi = _mm512_fmadd_ps(p, hi, ahi);
          }
          _mm512_storeu_ps(aj + 32 * c, alo);
          _mm512_storeu_ps(aj + 32 * c + 16, ahi);
        }
      }
    }
  }
}

#else
constexpr bool kVectorPath = false;
template <typename T>
inline int64_t lane(int64_t l) { return l; }
template <typename T>
void attend_tiles(const Item<T>&, const float*, float*, float*) {}
#endif

// ---- the portable kernel ----

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

// The portable kernel: plain loops the compiler vectorises, each item's blocks walked row by row, the next
// block asked for whole (into L1) while one is read. q: [B, H, D] float32; out: [B, H, D] float32, written here.
template <typename T>
void portable_impl(const Walk& w, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const int32_t* lens, int64_t max_len, double scale,
                   at::Tensor& out) {
  const auto [B, H, D, block_size, Hkv, G, max_blocks, token_stride, block_stride, runs, run] = w;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);
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
          prefetch_rows<3>(c + table[t1 / block_size] * block_stride + h0 * D, std::min(block_size, len - t1),
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

// ---- the walk ----

// The register-blocked kernel where it is faster (measured in engine decode steps, alternated with the portable
// kernel: bf16 at every batch size; float32 only while items are parts of a sequence, small batches; a float32
// batch of whole sequences ran 5-10% slower on it), else the portable one. q: [B, H, D] float32; out: [B, H, D]
// float32, written here.
template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const int32_t* lens, int64_t max_len, double scale,
                       at::Tensor& out) {
  const Walk w(q, k_cache, block_tables);
  const auto [B, H, D, block_size, Hkv, G, max_blocks, token_stride, block_stride, runs, run] = w;
  const bool vector = kVectorPath && D % 32 == 0 &&
                      (std::is_same_v<T, c10::BFloat16> || (std::is_same_v<T, float> && runs > 1));
  if (!vector) return portable_impl<T>(w, q, k_cache, v_cache, block_tables, lens, max_len, scale, out);
  auto item_at = [&](int64_t index) {
    const int64_t b = index / runs, h0 = index % runs * run;
    const int64_t nq = (std::min(h0 + run, Hkv) - h0) * G;
    return Item<T>{q.data_ptr<float>() + (b * H + h0 * G) * D, out.data_ptr<float>() + (b * H + h0 * G) * D,
                   k_cache.data_ptr<T>() + h0 * D, v_cache.data_ptr<T>() + h0 * D,
                   block_tables.data_ptr<int32_t>() + b * max_blocks, lens[b], nq, G, D, block_size,
                   token_stride, block_stride, static_cast<float>(scale)};
  };
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(run * G * max_len), qp(run * G * D), acc(run * G * D);
    Item<T> it = item_at(begin);
    for (int64_t p = 0; p < kAhead; ++p) {
      const Next<T> first = it.ahead(p);
      prefetch_rows(first.rows, first.n, token_stride, it.span());
    }
    for (int64_t index = begin; index < end; ++index) {
      Item<T> following = index + 1 < end ? item_at(index + 1) : it;
      it.following = index + 1 < end ? &following : nullptr;
      for (int64_t j = 0; j < it.nq; ++j)
        for (int64_t l = 0; l < D; ++l) qp[j * D + l] = it.q[j * D + l / 32 * 32 + lane<T>(l % 32)];
      std::fill(acc.begin(), acc.end(), 0.f);
      attend_tiles(it, qp.data(), scores.data(), acc.data());
      for (int64_t j = 0; j < it.nq; ++j)
        for (int64_t l = 0; l < D; ++l) it.out[j * D + l / 32 * 32 + lane<T>(l % 32)] = acc[j * D + l];
      it = following;
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
