// The memory-read bandwidth a decode kernel can get: every core streams its share of a large buffer with
// wide loads into independent accumulators (no stores, no arithmetic to wait on), as glm3_linear_xwt reads
// weights. Numpy's sums and a BLAS matrix-vector product measure 20-40% less on the same host, so a
// "fraction of the limit" against them flatters the kernels.
#include <cstdint>
#include <algorithm>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace {

using namespace glm3::simd;

float stream_sum(const float *p, int64_t n) {
  v16 a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 += *reinterpret_cast<const v16 *>(p + i);
    a1 += *reinterpret_cast<const v16 *>(p + i + 16);
    a2 += *reinterpret_cast<const v16 *>(p + i + 32);
    a3 += *reinterpret_cast<const v16 *>(p + i + 48);
  }
  const v16 a = (a0 + a1) + (a2 + a3);
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += a[l];
  for (; i < n; ++i) s += p[i];
  return s;
}
}  // namespace

// Read n floats at p once, split over the kernels' thread pool; returns their sum (so the reads happen).
extern "C" float glm3_stream_read(const float *p, int64_t n) {
  glm3::Pool &pool = glm3::pool();
  std::vector<float> sums(pool.size(), 0.f);
  const int64_t chunk = ((n + pool.size() - 1) / pool.size() + 1023) / 1024 * 1024;
  pool.run([&](unsigned part) {
    const int64_t b = std::min<int64_t>(n, part * chunk), e = std::min<int64_t>(n, b + chunk);
    sums[part] = stream_sum(p + b, e - b);
  });
  float s = 0.f;
  for (float v : sums) s += v;
  return s;
}
