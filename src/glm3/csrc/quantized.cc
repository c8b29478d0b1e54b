// glm3 CPU kernels of weight-only quantized linear layers (glm3.quantization's format):
//   glm3_linear_q8: y [m, n] = x [m, k] . dequant(W)^T, W int8 [n, k]
//   glm3_linear_q4: the same with W as packed int4 [n, k / 2] (each 32 weights: byte i holds weight i in its
//                   low nibble and weight i + 16 in its high one, both stored + 8)
// with float16 scales [n, k / group] (group a multiple of 32 dividing k); x and y float32.
//
// The weights are read as stored and converted in registers: no dequantized copy of W is ever in memory.
// Each output is sum over groups g of scale[j, g] * (x . q[j] over g), accumulated in 16 lanes in one fixed
// order, so a row's result is the same bits whatever the number of rows (the serving engine's batch
// invariance) and whichever path (decoding or prefill) computes it.
//
// Work: each thread owns a range of weight rows, taken in panels of kPanel rows; every block of up to four x
// rows runs over a panel before the next, so a panel is read from memory once and from L2 after that.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "layer_ops.h"
#include "pool.h"
#include "simd.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using namespace glm3::simd;


constexpr int64_t kPanel = 64;
constexpr int64_t kBlock = 32;  // weights per packing block (and the least group)
constexpr int64_t kAhead = 8;  // weight rows ahead that the loop prefetches (see csrc/linear.cc)

// 16 int32 lanes as floats, and 16 bytes widened to int32 lanes (GCC's generic conversions of int8 vectors
// are not vectorized: a scalar convert per lane; AVX-512's are one instruction each).
inline v16 to_float(i32x16 v) {
#if defined(__AVX512F__)
  __m512i raw;
  std::memcpy(&raw, &v, sizeof(raw));
  const __m512 f = _mm512_cvtepi32_ps(raw);
  v16 out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
#else
  return __builtin_convertvector(v, v16);
#endif
}
inline i32x16 widen_signed(const int8_t *p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  i32x16 out;
  std::memcpy(&out, &w, sizeof(out));
  return out;
#else
  return __builtin_convertvector(*reinterpret_cast<const i8x16 *>(p), i32x16);
#endif
}
inline i32x16 widen_unsigned(const uint8_t *p) {
#if defined(__AVX512F__)
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
  i32x16 out;
  std::memcpy(&out, &w, sizeof(out));
  return out;
#else
  return __builtin_convertvector(*reinterpret_cast<const u8x16 *>(p), i32x16);
#endif
}


struct Int8 {
  static constexpr int64_t row_bytes(int64_t k) { return k; }
  // The 32 weights of block b of a row as two vectors of 16.
  template <bool kDecoding>
  static inline void load(const uint8_t *row, int64_t b, v16 &lo, v16 &hi) {
    const int8_t *p = reinterpret_cast<const int8_t *>(row) + b * kBlock;
    lo = to_float(widen_signed(p));
    hi = to_float(widen_signed(p + 16));
  }
};

struct Int4 {
  static constexpr int64_t row_bytes(int64_t k) { return k / 2; }
  // kDecoding (one or two x rows): a nibble n is the float n - 8 looked up in a 16-entry table (vpermps reads
  // the low 4 bits of each lane), two instructions for 16 weights instead of a mask, a subtraction and a
  // conversion; with four x rows the product's own work keeps the shuffle port busy, and the arithmetic measured
  // faster. Both give the same floats.
  template <bool kDecoding>
  static inline void load(const uint8_t *row, int64_t b, v16 &lo, v16 &hi) {
#if defined(__AVX512F__)
    if (!kDecoding) {
      const i32x16 u = widen_unsigned(row + b * 16);
      lo = to_float((u & 15) - 8);
      hi = to_float((u >> 4) - 8);
      return;
    }
    const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(row + b * 16)));
    const __m512 l = _mm512_permutexvar_ps(u, table), h = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), table);
    std::memcpy(&lo, &l, sizeof(lo));
    std::memcpy(&hi, &h, sizeof(hi));
#else
    const i32x16 u = widen_unsigned(row + b * 16);
    lo = to_float((u & 15) - 8);
    hi = to_float((u >> 4) - 8);
#endif
  }
};

// `count` <= 16 float16 scales as float32.
inline void widen_scales(const _Float16 *src, int64_t count, float *dst) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  _mm512_store_ps(dst, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src)));
#else
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
#endif
}

// The scales of NR weight rows, group by group. Wide (decoding: one or two x rows): sixteen groups at a time
// widened to float32 into a small array, so that each group's scaling is one multiply-add whose scale is a
// broadcast load, not a conversion and a broadcast on the shuffle port, which the unpacking of 4-bit weights
// keeps busy; with four x rows that array measured slower (the tile is bound elsewhere), so each scale is read
// as it is needed.
template <int NR, bool kWide>
struct RowScales {
  const _Float16 *rows;  // [NR, groups]
  int64_t groups;
  void start(int64_t) {}
  float at(int r, int64_t g) const { return static_cast<float>(rows[r * groups + g]); }
};
template <int NR>
struct RowScales<NR, true> {
  const _Float16 *rows;
  int64_t groups;
  alignas(64) float wide[NR][16] = {};
  void start(int64_t g) {
    if (g % 16 == 0)
      for (int r = 0; r < NR; ++r) widen_scales(rows + r * groups + g, std::min<int64_t>(16, groups - g), wide[r]);
  }
  float at(int r, int64_t g) const { return wide[r][g % 16]; }
};

// Rows [0, MR) of x against weight rows [j, j + NR): y[i, j + r]. BPG: packing blocks per group when known
// when compiling (1 for the default group of 32: no inner loop to run), else 0.
template <typename Q, int MR, int NR, int BPG = 0>
void tile(const float *x, int64_t k, const uint8_t *w, const _Float16 *scales, int64_t groups, int64_t group,
          float *y, int64_t ldy, int64_t j) {
  const int64_t rb = Q::row_bytes(k);
  const uint8_t *rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = w + (j + r) * rb;
  v16 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = v16{};
  RowScales<NR, MR <= 2> scale{scales + j * groups, groups};
  const int64_t blocks_per_group = BPG ? BPG : group / kBlock;
  for (int64_t g = 0; g < groups; ++g) {
    scale.start(g);
    v16 part[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < NR; ++r) part[i][r] = v16{};
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      if ((b * Q::row_bytes(kBlock)) % 64 == 0)
        for (int r = 0; r < NR; ++r) __builtin_prefetch(rows[r] + kAhead * rb + b * Q::row_bytes(kBlock));
      v16 lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) Q::template load<MR <= 2>(rows[r], b, lo[r], hi[r]);
      for (int i = 0; i < MR; ++i) {
        const v16 x0 = load16(x + i * k + b * kBlock), x1 = load16(x + i * k + b * kBlock + 16);
        for (int r = 0; r < NR; ++r) {
          part[i][r] += x0 * lo[r];
          part[i][r] += x1 * hi[r];
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const v16 s = splat16(scale.at(r, g));
      for (int i = 0; i < MR; ++i) acc[i][r] += part[i][r] * s;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) y[i * ldy + j + r] = hsum16(acc[i][r]);
}

template <typename Q, int MR>
void rows_block(const float *x, int64_t k, const uint8_t *w, const _Float16 *scales, int64_t groups, int64_t group,
                float *y, int64_t ldy, int64_t j0, int64_t j1) {
  constexpr int NR = MR <= 2 ? 4 : 2;
  int64_t j = j0;
  if (MR <= 2 && group == kBlock) {  // decoding: with four x rows the unrolled loop measured slower
    for (; j + NR <= j1; j += NR) tile<Q, MR, NR, 1>(x, k, w, scales, groups, group, y, ldy, j);
  } else {
    for (; j + NR <= j1; j += NR) tile<Q, MR, NR>(x, k, w, scales, groups, group, y, ldy, j);
  }
  for (; j < j1; ++j) tile<Q, MR, 1>(x, k, w, scales, groups, group, y, ldy, j);
}

template <typename Q>
void rows_of_x(const float *x, int64_t m, int64_t k, const uint8_t *w, const _Float16 *scales, int64_t groups,
               int64_t group, float *y, int64_t n, int64_t j0, int64_t j1) {
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const float *xi = x + i0 * k;
    float *yi = y + i0 * n;
    switch (std::min<int64_t>(4, m - i0)) {
      case 1: rows_block<Q, 1>(xi, k, w, scales, groups, group, yi, n, j0, j1); break;
      case 2: rows_block<Q, 2>(xi, k, w, scales, groups, group, yi, n, j0, j1); break;
      case 3: rows_block<Q, 3>(xi, k, w, scales, groups, group, yi, n, j0, j1); break;
      default: rows_block<Q, 4>(xi, k, w, scales, groups, group, yi, n, j0, j1); break;
    }
  }
}

template <typename Q>
void linear(const float *x, const uint8_t *w, const _Float16 *scales, float *y, int64_t m, int64_t k, int64_t n,
            int64_t group) {
  const int64_t groups = k / group;
  glm3::parallel_ranges(n, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t j0 = p0; j0 < p1; j0 += kPanel)
      rows_of_x<Q>(x, m, k, w, scales, groups, group, y, n, j0, std::min(p1, j0 + kPanel));
  });
}

template <typename Q>
int run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, const char *wtype) {
  if (nparam != 4 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], wtype) != 0 ||
      std::strcmp(dtypes[2], "float16") != 0 || std::strcmp(dtypes[3], "float32") != 0)
    return 2;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0], groups = shapes[2][1];
  if (k % kBlock != 0 || shapes[1][1] != Q::row_bytes(k) || shapes[2][0] != n || groups < 1 || k % groups != 0 ||
      (k / groups) % kBlock != 0)
    return 1;
  linear<Q>(static_cast<const float *>(params[0]), static_cast<const uint8_t *>(params[1]),
            static_cast<const _Float16 *>(params[2]), static_cast<float *>(params[3]), m, k, n, k / groups);
  return 0;
}

}  // namespace

void glm3::quantized_xwt(const float *x, const uint8_t *w, const _Float16 *scales, int bits, float *y, int64_t m,
                         int64_t k, int64_t n, int64_t group) {
  if (bits == 8) {
    linear<Int8>(x, w, scales, y, m, k, n, group);
  } else {
    linear<Int4>(x, w, scales, y, m, k, n, group);
  }
}

// Inputs x [m, k] float32, w int8 [n, k], scales float16 [n, k / group]; output y [m, n] float32.
extern "C" int glm3_linear_q8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return run<Int8>(nparam, params, ndims, shapes, dtypes, "int8");
}

// Inputs x [m, k] float32, w uint8 [n, k / 2] (packed int4), scales float16 [n, k / group]; output y [m, n].
extern "C" int glm3_linear_q4(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return run<Int4>(nparam, params, ndims, shapes, dtypes, "uint8");
}
