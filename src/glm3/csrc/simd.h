// GCC vector types and the few operations on them every kernel uses: 8 and 16 float32 lanes (one AVX or
// one AVX-512 register; the compiler splits a 16-lane vector where the host has no AVX-512), the narrow
// integer and half-precision vectors the weight loaders widen, unaligned loads and stores, broadcasts and
// horizontal sums in lane order (the order fixes the bits every kernel's sums get).
#pragma once

#include <cstdint>

namespace glm3 {
namespace simd {

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef _Float16 h8 __attribute__((vector_size(16), aligned(2)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16), aligned(1)));
typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline v8 load8(const float *p) { return *reinterpret_cast<const v8 *>(p); }
inline void store8(float *p, v8 v) { *reinterpret_cast<v8 *>(p) = v; }
inline v8 splat8(float s) { return v8{s, s, s, s, s, s, s, s}; }
inline float hsum8(v8 v) {
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

inline v16 load16(const float *p) { return *reinterpret_cast<const v16 *>(p); }
inline v16 splat16(float s) { return v16{} + s; }
inline float hsum16(v16 v) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += v[l];
  return s;
}

}  // namespace simd
}  // namespace glm3
