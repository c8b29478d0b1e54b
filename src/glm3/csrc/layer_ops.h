// The computations of glm3's CPU kernels as C++ functions, for the kernels that compose several of them in one
// call (decode_layer.cc). Each is defined beside the AOT operator that exposes it alone (linear.cc,
// quantized.cc, elementwise.cc, paged_attention.cc), and both run the same code: a layer computes the same bits
// fused or operator by operator. Arguments are trusted here: the operators validate shapes and dtypes first.
#pragma once

#include <cstdint>

namespace glm3 {

// y [m, n] = x [m, k] . W [n, k]^T, W float32 / float16 / bfloat16 (kind 1 / 2 / 3, see float_types.h).
void float_xwt(const float *x, const void *w, int kind, float *y, int64_t m, int64_t k, int64_t n);

// The same with W weight-only quantized (glm3.quantization): bits 8 (int8 [n, k]) or 4 (packed [n, k / 2]),
// float16 scales [n, k / group].
void quantized_xwt(const float *x, const uint8_t *w, const _Float16 *scales, int bits, float *y, int64_t m,
                   int64_t k, int64_t n, int64_t group);

// y [m, h] = x * rsqrt(mean(x^2) + eps) * w, w of float kind `kind`.
void rms_norm(const float *x, const void *w, int kind, float eps, float *y, int64_t m, int64_t h);

// y [m, f] = silu(a) * b for x = [a | b] [m, 2f].
void swiglu(const float *x, float *y, int64_t m, int64_t f);

// A paged decoding layer's attention from its qkv projection (see glm3_paged_decode): qkv [b, (heads + 2
// groups) d] plus bias, RoPE with cos / sin [b, half], k and v written into the caches [nb, bs, groups, d] at
// slots [b] in place, attention over each row's first lens[r] tokens through tables [b, width] -> out
// [b, heads * d].
struct PagedCache {
  float *keys, *values;
  int64_t num_blocks, block_size, groups, head_dim;
  const int32_t *slots, *tables, *lens;
  int64_t table_width;
};
// The cache of an operator's inputs: key and value caches at `at` and at + 1, slots, tables and lengths next.
inline PagedCache paged_cache(void **params, int64_t **shapes, int at) {
  return PagedCache{static_cast<float *>(params[at]),
                    static_cast<float *>(params[at + 1]),
                    shapes[at][0],
                    shapes[at][1],
                    shapes[at][2],
                    shapes[at][3],
                    static_cast<const int32_t *>(params[at + 2]),
                    static_cast<const int32_t *>(params[at + 3]),
                    static_cast<const int32_t *>(params[at + 4]),
                    shapes[at + 3][1]};
}
void paged_decode(const float *qkv, const float *bias, const float *cos, const float *sin, const PagedCache &cache,
                  int64_t b, int64_t heads, int64_t half, float scale, float *out);

// 0 when slots, block tables and lengths of b rows lie within the cache, else 3 (the operators' error code).
int check_paged(const PagedCache &cache, int64_t b);

}  // namespace glm3
