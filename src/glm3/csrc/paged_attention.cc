// glm3 CPU kernels of the paged KV cache (float32 caches [num_blocks, block_size, groups, d]):
//   glm3_cache_write:     cache[slots[i]] = rows[i] for rows [n, groups, d], IN PLACE; returns a flag [1]
//   glm3_paged_attention: out [b, heads * d] = softmax(q k^T * scale) v for one query per row, q [b, heads, d],
//                         over the first lens[r] tokens of row r's blocks (tables [b, w]), read where they lie
//   glm3_paged_decode:    the two above and everything between the qkv projection and attention's output in one
//                         call: qkv [b, heads*d + 2*groups*d] plus its bias, RoPE on q and k (cos, sin [b, half]),
//                         k and v written into the caches IN PLACE at slots [b], attention -> out [b, heads * d]
//
// Why the fused one: on CPU every MindSpore operator costs 10-20 us to launch, and the slicing, rotation, writes
// and attention of one decoding layer were about 30 of them (0.8 ms a layer, a third of a bench-shape step).
//
// Why: MindSpore's ops are functional, so a cache that is a graph input is copied whole every time a token is
// written into it (tensor_scatter_update; an in-place scatter into a Parameter copies as well on CPU): measured
// at 7 ms a step for 321 blocks of the bench shape, at the 6B shape 205 MB a step for the default 224 blocks.
// Here a token's keys and values are written where they belong and nothing else moves; attention reads the
// blocks through the table instead of gathering them into a copy first.
//
// The write changes its input: the caller orders the attention after it (a depend edge on the flag) and keeps
// the cache tensors it passed in, which are the cache from then on. A row's result is computed by one thread
// in one fixed order, whatever the other rows, so it is the same bits in any batch.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "layer_ops.h"
#include "pool.h"
#include "simd.h"

namespace {

using namespace glm3::simd;


inline float dot(const float *a, const float *b, int64_t d) {
  v8 acc{};
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) acc += load8(a + t) * load8(b + t);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; t < d; ++t) s += a[t] * b[t];
  return s;
}

inline void axpy(float *y, float a, const float *x, int64_t d) {
  int64_t t = 0;
  const v8 av{a, a, a, a, a, a, a, a};
  for (; t + 8 <= d; t += 8) store8(y + t, load8(y + t) + av * load8(x + t));
  for (; t < d; ++t) y[t] += a * x[t];
}

// Row r, group g: the rep = heads / groups query heads of the group against the row's keys and values.
void attend(const float *q, const float *kc, const float *vc, const int32_t *table, int32_t len, float *out,
            int64_t block_size, int64_t groups, int64_t rep, int64_t d, float scale, int64_t g,
            std::vector<float> &scores) {
  scores.resize(static_cast<size_t>(len));
  const int64_t stride = groups * d;  // floats per cache slot
  for (int64_t h = 0; h < rep; ++h) {
    const float *qh = q + (g * rep + h) * d;
    float *oh = out + (g * rep + h) * d;
    float top = -INFINITY;
    for (int32_t t = 0; t < len; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
      scores[t] = dot(qh, kc + slot * stride + g * d, d) * scale;
      top = std::max(top, scores[t]);
    }
    float total = 0.f;
    for (int32_t t = 0; t < len; ++t) {
      scores[t] = std::exp(scores[t] - top);
      total += scores[t];
    }
    std::memset(oh, 0, sizeof(float) * d);
    for (int32_t t = 0; t < len; ++t) {
      const int64_t slot = static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size;
      axpy(oh, scores[t] / total, vc + slot * stride + g * d, d);
    }
  }
}

bool f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }
bool i32(const char *dtype) { return std::strcmp(dtype, "int32") == 0; }

}  // namespace

// Inputs cache [nb, bs, g, d] float32, rows [n, g, d] float32, slots [n] int32; output flag [1] int32.
extern "C" int glm3_cache_write(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 4 || ndims[1] != 3 || ndims[2] != 1) return 1;
  if (!f32(dtypes[0]) || !f32(dtypes[1]) || !i32(dtypes[2])) return 2;
  const int64_t slots_total = shapes[0][0] * shapes[0][1], width = shapes[0][2] * shapes[0][3];
  if (shapes[1][1] * shapes[1][2] != width || shapes[1][0] != shapes[2][0]) return 1;
  float *cache = static_cast<float *>(params[0]);
  const float *rows = static_cast<const float *>(params[1]);
  const int32_t *slots = static_cast<const int32_t *>(params[2]);
  for (int64_t i = 0; i < shapes[1][0]; ++i) {
    if (slots[i] < 0 || slots[i] >= slots_total) return 3;
    std::memcpy(cache + slots[i] * width, rows + i * width, sizeof(float) * width);
  }
  static_cast<int32_t *>(params[3])[0] = 1;
  return 0;
}

// Inputs q [b, heads, d], key and value caches [nb, bs, g, d] (float32), tables [b, w] int32, lens [b] int32,
// scale [1] float32; output [b, heads * d] float32.
extern "C" int glm3_paged_attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7 || ndims[0] != 3 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 2 || ndims[4] != 1) return 1;
  for (int i : {0, 1, 2, 5, 6})
    if (!f32(dtypes[i])) return 2;
  if (!i32(dtypes[3]) || !i32(dtypes[4])) return 2;
  const int64_t b = shapes[0][0], heads = shapes[0][1], d = shapes[0][2];
  const int64_t num_blocks = shapes[1][0], block_size = shapes[1][1], groups = shapes[1][2], width = shapes[3][1];
  if (shapes[1][3] != d || heads % groups != 0 || shapes[3][0] != b || shapes[4][0] != b) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *kc = static_cast<const float *>(params[1]);
  const float *vc = static_cast<const float *>(params[2]);
  const int32_t *tables = static_cast<const int32_t *>(params[3]);
  const int32_t *lens = static_cast<const int32_t *>(params[4]);
  const float scale = static_cast<const float *>(params[5])[0];
  float *out = static_cast<float *>(params[6]);
  for (int64_t r = 0; r < b; ++r) {
    if (lens[r] < 1 || lens[r] > width * block_size) return 3;
    for (int64_t k = 0; k < (lens[r] + block_size - 1) / block_size; ++k)
      if (tables[r * width + k] < 0 || tables[r * width + k] >= num_blocks) return 3;
  }
  const int64_t rep = heads / groups;
  glm3::parallel_ranges(b * groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / groups, g = task % groups;
      attend(q + r * heads * d, kc, vc, tables + r * width, lens[r], out + r * heads * d, block_size, groups, rep,
             d, scale, g, scores);
    }
  });
  return 0;
}

namespace {
// ChatGLM's RoPE on one head in place: the first 2 * half channels rotate in adjacent pairs.
inline void rotate(float *x, const float *cos, const float *sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * cos[i] - x1 * sin[i];
    x[2 * i + 1] = x1 * cos[i] + x0 * sin[i];
  }
}
}  // namespace

int glm3::check_paged(const PagedCache &c, int64_t b) {
  for (int64_t r = 0; r < b; ++r) {
    if (c.slots[r] < 0 || c.slots[r] >= c.num_blocks * c.block_size) return 3;
    if (c.lens[r] < 1 || c.lens[r] > c.table_width * c.block_size) return 3;
    for (int64_t k = 0; k < (c.lens[r] + c.block_size - 1) / c.block_size; ++k)
      if (c.tables[r * c.table_width + k] < 0 || c.tables[r * c.table_width + k] >= c.num_blocks) return 3;
  }
  return 0;
}

void glm3::paged_decode(const float *qkv, const float *bias, const float *cos, const float *sin, const PagedCache &c,
                        int64_t b, int64_t heads, int64_t half, float scale, float *out) {
  const int64_t groups = c.groups, d = c.head_dim, width_qkv = (heads + 2 * groups) * d;
  // q of every row (biased, rotated) in one buffer; k and v straight into their cache slots.
  thread_local std::vector<float> q;
  q.resize(static_cast<size_t>(b * heads * d));
  const int64_t kv = groups * d;
  for (int64_t r = 0; r < b; ++r) {
    const float *src = qkv + r * width_qkv;
    float *qr = q.data() + r * heads * d;
    float *kr = c.keys + static_cast<int64_t>(c.slots[r]) * kv;
    float *vr = c.values + static_cast<int64_t>(c.slots[r]) * kv;
    for (int64_t i = 0; i < heads * d; ++i) qr[i] = src[i] + bias[i];
    for (int64_t i = 0; i < kv; ++i) kr[i] = src[heads * d + i] + bias[heads * d + i];
    for (int64_t i = 0; i < kv; ++i) vr[i] = src[heads * d + kv + i] + bias[heads * d + kv + i];
    for (int64_t h = 0; h < heads; ++h) rotate(qr + h * d, cos + r * half, sin + r * half, half);
    for (int64_t g = 0; g < groups; ++g) rotate(kr + g * d, cos + r * half, sin + r * half, half);
  }
  const int64_t rep = heads / groups;
  const float *qs = q.data();
  glm3::parallel_ranges(b * groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / groups, g = task % groups;
      attend(qs + r * heads * d, c.keys, c.values, c.tables + r * c.table_width, c.lens[r], out + r * heads * d,
             c.block_size, groups, rep, d, scale, g, scores);
    }
  });
}

// Inputs qkv [b, (heads + 2 groups) d], bias [(heads + 2 groups) d], cos and sin [b, half], key and value caches
// [nb, bs, groups, d], slots [b], tables [b, w], lens [b] (int32), scale [1], heads [1] (int32); output
// [b, heads * d]. Row r's key and value go to slot slots[r] before it attends over its first lens[r] tokens.
extern "C" int glm3_paged_decode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 12 || ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 2 || ndims[3] != 2 || ndims[4] != 4 ||
      ndims[5] != 4 || ndims[6] != 1 || ndims[7] != 2 || ndims[8] != 1)
    return 1;
  for (int i : {0, 1, 2, 3, 4, 5, 9, 11})
    if (!f32(dtypes[i])) return 2;
  for (int i : {6, 7, 8, 10})
    if (!i32(dtypes[i])) return 2;
  const int64_t b = shapes[0][0], width_qkv = shapes[0][1], half = shapes[2][1];
  const glm3::PagedCache cache = glm3::paged_cache(params, shapes, 4);
  const int64_t groups = cache.groups, d = cache.head_dim;
  const int64_t heads = static_cast<const int32_t *>(params[10])[0];
  if (heads < 1 || heads % groups != 0 || width_qkv != (heads + 2 * groups) * d || shapes[1][0] != width_qkv ||
      shapes[2][0] != b || shapes[3][0] != b || shapes[3][1] != half || 2 * half > d || shapes[6][0] != b ||
      shapes[7][0] != b || shapes[8][0] != b)
    return 1;
  if (const int bad = glm3::check_paged(cache, b)) return bad;
  glm3::paged_decode(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                     static_cast<const float *>(params[2]), static_cast<const float *>(params[3]), cache, b, heads,
                     half, static_cast<const float *>(params[9])[0], static_cast<float *>(params[11]));
  return 0;
}
