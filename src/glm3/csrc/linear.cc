// glm3 CPU kernels: the two products of a linear layer, reading the weight as stored (float32, float16 or
// bfloat16) and converting it in registers, so a half-precision weight is read at half the bytes and never
// expanded into a float32 copy in memory:
//   glm3_linear_xwt: y [m, n] = x [m, k] . W [n, k]^T   (forward, any m; decoding is m <= 8)
//   glm3_linear_xw:  y [m, k] = x [m, n] . W [n, k]     (backward of the forward: dx = dy . W)
// x and y are float32. Built on first use by glm3/kernels/linear.py with the host compiler and called as
// MindSpore AOT custom operators.
//
// Why: decoding is bound by reading the weights, and MindSpore's CPU MatMul reads a [65024, 1024] weight
// at about half the memory bandwidth when x has one row; a half-precision weight must moreover be cast to a
// float32 copy first, and MindSpore keeps such casts alive (a float32 copy of the model while training LoRA
// over a float16 base). Here nothing but the weight itself and small per-thread tiles is ever in memory.
//
// Work is split over the cores by the pool of pool.h.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "float_types.h"
#include "layer_ops.h"
#include "pool.h"
#include "simd.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using namespace glm3::simd;

using glm3::parallel_ranges;

struct bf16 {
  uint16_t bits;
};


// Eight weights as float32, whatever their storage.
inline v8 ldw(const float *p) { return load8(p); }
inline v8 ldw(const _Float16 *p) {
#if defined(__F16C__)
  // GCC's generic vector conversion of _Float16 is not vectorized (8 GB/s measured); F16C's is.
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  v8 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
#else
  return __builtin_convertvector(*reinterpret_cast<const h8 *>(p), v8);
#endif
}
inline v8 ldw(const bf16 *p) {
  const u32x8 wide = __builtin_convertvector(*reinterpret_cast<const u16x8 *>(p), u32x8) << 16;
  v8 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
// Sixteen weights as float32 (one 64-byte vector; the compiler splits it where the host has no AVX-512).
inline v16 ldw16(const float *p) { return load16(p); }
inline v16 ldw16(const _Float16 *p) {
#if defined(__AVX512F__)
  const __m512 wide = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
  v16 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
#else
  const v8 lo = ldw(p), hi = ldw(p + 8);
  v16 out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char *>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#endif
}
inline v16 ldw16(const bf16 *p) {
  const u32x16 wide = __builtin_convertvector(*reinterpret_cast<const u16x16 *>(p), u32x16) << 16;
  v16 out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
inline float scalar(float v) { return v; }
inline float scalar(_Float16 v) { return static_cast<float>(v); }
inline float scalar(bf16 v) { return glm3::bf16_to_float(v.bits); }
// ---------------------------------------------------------------------------------------------- x W^T
// M <= 4 rows of x against weight rows [j0, j1): weights converted in registers as they stream by, so
// every weight is read once per call.
// Rows ahead that the weight-streaming loop prefetches: rows are short (2-4 KB in decoding shapes), so the
// hardware prefetcher alone starts every row late (measured: the [65024, 1024] float16 output layer read at
// 21 GB/s without, 28 GB/s with, on a 30 GB/s host).
constexpr int64_t PF = 4;
template <int M, typename W>
void xwt_rows(const float *x, int64_t ldx, const W *w, float *y, int64_t ldy, int64_t k, int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const W *w0 = w + j * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
    v16 c0[M], c1[M], c2[M], c3[M];
    for (int i = 0; i < M; ++i) c0[i] = c1[i] = c2[i] = c3[i] = v16{};
    int64_t t = 0;
    for (; t + 16 <= k; t += 16) {
      if (t % (64 / sizeof(W)) == 0) {  // the next four rows, one cache line each per row
        __builtin_prefetch(w0 + PF * k + t);
        __builtin_prefetch(w1 + PF * k + t);
        __builtin_prefetch(w2 + PF * k + t);
        __builtin_prefetch(w3 + PF * k + t);
      }
      const v16 b0 = ldw16(w0 + t), b1 = ldw16(w1 + t), b2 = ldw16(w2 + t), b3 = ldw16(w3 + t);
      for (int i = 0; i < M; ++i) {
        const v16 xv = load16(x + i * ldx + t);
        c0[i] += xv * b0;
        c1[i] += xv * b1;
        c2[i] += xv * b2;
        c3[i] += xv * b3;
      }
    }
    v8 a0[M], a1[M], a2[M], a3[M];
    for (int i = 0; i < M; ++i) a0[i] = a1[i] = a2[i] = a3[i] = v8{};
    for (; t + 8 <= k; t += 8) {
      const v8 b0 = ldw(w0 + t), b1 = ldw(w1 + t), b2 = ldw(w2 + t), b3 = ldw(w3 + t);
      for (int i = 0; i < M; ++i) {
        const v8 xv = load8(x + i * ldx + t);
        a0[i] += xv * b0;
        a1[i] += xv * b1;
        a2[i] += xv * b2;
        a3[i] += xv * b3;
      }
    }
    for (int i = 0; i < M; ++i) {
      float s0 = hsum16(c0[i]) + hsum8(a0[i]), s1 = hsum16(c1[i]) + hsum8(a1[i]);
      float s2 = hsum16(c2[i]) + hsum8(a2[i]), s3 = hsum16(c3[i]) + hsum8(a3[i]);
      for (int64_t r = t; r < k; ++r) {
        const float xv = x[i * ldx + r];
        s0 += xv * scalar(w0[r]);
        s1 += xv * scalar(w1[r]);
        s2 += xv * scalar(w2[r]);
        s3 += xv * scalar(w3[r]);
      }
      float *yr = y + i * ldy + j;
      yr[0] = s0;
      yr[1] = s1;
      yr[2] = s2;
      yr[3] = s3;
    }
  }
  for (; j < j1; ++j) {
    for (int i = 0; i < M; ++i) {
      float s = 0.f;
      for (int64_t r = 0; r < k; ++r) s += x[i * ldx + r] * scalar(w[j * k + r]);
      y[i * ldy + j] = s;
    }
  }
}

template <typename W>
void xwt_block(const float *x, int64_t ldx, int64_t rows, const W *w, float *y, int64_t ldy, int64_t k,
               int64_t j0, int64_t j1) {
  switch (rows) {
    case 1: xwt_rows<1, W>(x, ldx, w, y, ldy, k, j0, j1); break;
    case 2: xwt_rows<2, W>(x, ldx, w, y, ldy, k, j0, j1); break;
    case 3: xwt_rows<3, W>(x, ldx, w, y, ldy, k, j0, j1); break;
    default: xwt_rows<4, W>(x, ldx, w, y, ldy, k, j0, j1); break;
  }
}

// Weight rows per tile when m > 8: the tile is converted once into a per-thread float32 buffer (kept in L2)
// and every group of four x rows is multiplied with it, so each weight is read from memory once.
constexpr int64_t kTileRows = 16;

template <typename W>
void xwt(const float *x, const W *w, float *y, int64_t m, int64_t k, int64_t n) {
  if (m <= 8) {  // decoding: stream the weights straight from memory, once per four rows of x
    parallel_ranges(n, 4, [&](int64_t j0, int64_t j1) {
      for (int64_t i0 = 0; i0 < m; i0 += 4)
        xwt_block(x + i0 * k, k, std::min<int64_t>(4, m - i0), w, y + i0 * n, n, k, j0, j1);
    });
    return;
  }
  parallel_ranges(n, kTileRows, [&](int64_t j0, int64_t j1) {
    thread_local std::vector<float> tile;
    tile.resize(static_cast<size_t>(kTileRows * k));
    for (int64_t jt = j0; jt < j1; jt += kTileRows) {
      const int64_t rows = std::min<int64_t>(kTileRows, j1 - jt);
      for (int64_t r = 0; r < rows; ++r) {
        const W *src = w + (jt + r) * k;
        float *dst = tile.data() + r * k;
        int64_t t = 0;
        for (; t + 8 <= k; t += 8) store8(dst + t, ldw(src + t));
        for (; t < k; ++t) dst[t] = scalar(src[t]);
      }
      // y[:, jt:jt+rows] from the float32 tile, whose rows are numbered from 0.
      for (int64_t i0 = 0; i0 < m; i0 += 4) {
        xwt_block<float>(x + i0 * k, k, std::min<int64_t>(4, m - i0), tile.data(), y + i0 * n + jt, n, k, 0, rows);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------- x W
// y [m, k] = x [m, n] . W [n, k]. Each thread owns a range of output columns; within it, 16-column chunks
// are accumulated over weight rows in tiles that stay in L1 while every group of four x rows uses them.
constexpr int64_t kCols = 16;
constexpr int64_t kRowTile = 256;

template <typename W>
void xw(const float *x, const W *w, float *y, int64_t m, int64_t n, int64_t k) {
  parallel_ranges(k, kCols, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < m; ++i) std::fill(y + i * k + c0, y + i * k + c1, 0.f);
    for (int64_t c = c0; c < c1; c += kCols) {
      const int64_t width = std::min<int64_t>(kCols, c1 - c);
      if (width < kCols) {  // the ragged last chunk: plain loops
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const float xv = x[i * n + j];
            for (int64_t q = 0; q < width; ++q) y[i * k + c + q] += xv * scalar(w[j * k + c + q]);
          }
        continue;
      }
      for (int64_t jt = 0; jt < n; jt += kRowTile) {
        const int64_t j1 = std::min<int64_t>(n, jt + kRowTile);
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {
          v8 acc[4][2];
          for (int r = 0; r < 4; ++r) {
            acc[r][0] = load8(y + (i + r) * k + c);
            acc[r][1] = load8(y + (i + r) * k + c + 8);
          }
          for (int64_t j = jt; j < j1; ++j) {
            const v8 w0 = ldw(w + j * k + c), w1 = ldw(w + j * k + c + 8);
            for (int r = 0; r < 4; ++r) {
              const v8 xv = splat8(x[(i + r) * n + j]);
              acc[r][0] += xv * w0;
              acc[r][1] += xv * w1;
            }
          }
          for (int r = 0; r < 4; ++r) {
            store8(y + (i + r) * k + c, acc[r][0]);
            store8(y + (i + r) * k + c + 8, acc[r][1]);
          }
        }
        for (; i < m; ++i) {
          v8 a0 = load8(y + i * k + c), a1 = load8(y + i * k + c + 8);
          for (int64_t j = jt; j < j1; ++j) {
            const v8 xv = splat8(x[i * n + j]);
            a0 += xv * ldw(w + j * k + c);
            a1 += xv * ldw(w + j * k + c + 8);
          }
          store8(y + i * k + c, a0);
          store8(y + i * k + c + 8, a1);
        }
      }
    }
  });
}

}  // namespace

void glm3::float_xwt(const float *x, const void *w, int kind, float *y, int64_t m, int64_t k, int64_t n) {
  switch (kind) {
    case 1: xwt(x, static_cast<const float *>(w), y, m, k, n); break;
    case 2: xwt(x, static_cast<const _Float16 *>(w), y, m, k, n); break;
    default: xwt(x, static_cast<const bf16 *>(w), y, m, k, n); break;
  }
}

// Inputs x [m, k], w [n, k]; output y [m, n].
extern "C" int glm3_linear_xwt(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][1]) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0) return 2;
  const int kind = glm3::float_kind(dtypes[1]);
  if (kind == 0) return 2;
  glm3::float_xwt(static_cast<const float *>(params[0]), params[1], kind, static_cast<float *>(params[2]),
                  shapes[0][0], shapes[0][1], shapes[1][0]);
  return 0;
}

// Inputs x [m, n], w [n, k]; output y [m, k].
extern "C" int glm3_linear_xw(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || shapes[0][1] != shapes[1][0]) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[2], "float32") != 0) return 2;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  const int64_t m = shapes[0][0], n = shapes[0][1], k = shapes[1][1];
  switch (glm3::float_kind(dtypes[1])) {
    case 1: xw(x, static_cast<const float *>(params[1]), y, m, n, k); return 0;
    case 2: xw(x, static_cast<const _Float16 *>(params[1]), y, m, n, k); return 0;
    case 3: xw(x, static_cast<const bf16 *>(params[1]), y, m, n, k); return 0;
    default: return 2;
  }
}
