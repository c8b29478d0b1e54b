// glm3 CPU kernels of a decoding layer's elementwise steps, each one operator instead of several:
//   glm3_rms_norm: y [m, h] = x * rsqrt(mean(x^2) + eps) * w, x float32, w float32/float16/bfloat16
//   glm3_swiglu:   y [m, f] = silu(a) * b for x = [a | b] [m, 2f]
// Why: on CPU every MindSpore operator costs 10-20 us to launch, and RMSNorm alone was nine of them; at one
// token per row these steps take far longer to launch than to compute. Inference only (no gradients).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_types.h"
#include "layer_ops.h"
#include "pool.h"

void glm3::rms_norm(const float *x, const void *w, int kind, float eps, float *y, int64_t m, int64_t h) {
  auto rows = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * h;
      float *yr = y + r * h;
      float sum = 0.f;
      for (int64_t i = 0; i < h; ++i) sum += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
      for (int64_t i = 0; i < h; ++i) yr[i] = xr[i] * inv * glm3::float_at(w, kind, i);
    }
  };
  if (m < 4) {
    rows(0, m);  // waking the pool costs more than a few rows
  } else {
    glm3::parallel_ranges(m, 1, rows);
  }
}

void glm3::swiglu(const float *x, float *y, int64_t m, int64_t f) {
  glm3::parallel_ranges(m * f, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = i / f, c = i % f;
      const float a = x[r * 2 * f + c];
      y[i] = a / (1.f + std::exp(-a)) * x[r * 2 * f + f + c];
    }
  });
}

// Inputs x [m, h] float32, w [h], eps [1] float32; output y [m, h] float32.
extern "C" int glm3_rms_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 1 || shapes[1][0] != shapes[0][1]) return 1;
  const int kind = glm3::float_kind(dtypes[1]);
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0 || kind == 0) return 2;
  glm3::rms_norm(static_cast<const float *>(params[0]), params[1], kind, static_cast<const float *>(params[2])[0],
                 static_cast<float *>(params[3]), shapes[0][0], shapes[0][1]);
  return 0;
}

// Input x [m, 2f] float32; output y [m, f] float32.
extern "C" int glm3_swiglu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2 || ndims[0] != 2 || shapes[0][1] % 2 != 0) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], "float32") != 0) return 2;
  glm3::swiglu(static_cast<const float *>(params[0]), static_cast<float *>(params[1]), shapes[0][0],
               shapes[0][1] / 2);
  return 0;
}
