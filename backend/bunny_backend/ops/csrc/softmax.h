// The float32 softmax our attention kernels share (paged_decode.cpp, causal_attention.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace bunny {

// In place: s[0..n) = exp(s - max) / sum.
inline void softmax(float* s, int64_t n) {
  float m = s[0];
  for (int64_t t = 1; t < n; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < n; ++t) s[t] *= inv;
}

}  // namespace bunny
