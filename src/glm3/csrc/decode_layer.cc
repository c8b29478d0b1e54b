// glm3 CPU kernel of one whole decoding layer over the paged KV cache (inference), in one operator call:
//   glm3_decode_layer: out [b, H] = the GLM block on x [b, H], one token per row: RMSNorm, the qkv product,
//   its bias, RoPE, the k / v writes into the block caches (IN PLACE), attention, the dense product, the
//   residual, RMSNorm, the SwiGLU MLP's two products and the last residual.
//
// Why: at one token per row a layer is a dozen small operators, and on CPU MindSpore spends 50-100 us of
// its own on each (launch, memory bookkeeping), while our kernel threads wait: a bench-shape step spent
// about a fifth of its time there. With one call per layer a bench-shape step launches 7 operators instead of 50.
// Each computation is the very function the single operators call (layer_ops.h), in the same order, so a
// layer gives the same bits fused or not, in any batch.
//
// Inputs, in order:
//    0 x [b, H] float32            1 input_layernorm weight [H] (float32 / float16 / bfloat16)
//    2 qkv weight, 3 its scales    4 qkv bias [Q] (float kinds as 1; zeros when the model has none)
//    5 dense weight, 6 its scales  7 post_attention_layernorm weight [H]
//    8 dense_h_to_4h weight, 9 its scales    10 dense_4h_to_h weight, 11 its scales
//   12 rope cos [S, half], 13 rope sin [S, half] (float32)    14 positions [b] int32
//   15 key cache, 16 value cache [nb, bs, groups, d] float32 (written in place)
//   17 slots [b], 18 block tables [b, w], 19 context lengths [b] (int32)
//   20 constants [4] float32: eps, attention scale, query heads, residual from the norm (0 / 1)
//   21 output [b, H] float32
// A weight is float32 / float16 / bfloat16 [n, k] (its scales input is unused), int8 [n, k] or packed int4
// (uint8 [n, k / 2]) with float16 scales [n, k / group] (glm3.quantization).
// Returns 1 for a shape, 2 for a dtype, 3 for an index out of its range.
#include <cstdint>
#include <cstring>
#include <vector>

#include "float_types.h"
#include "layer_ops.h"

namespace {

constexpr int64_t kQuantBlock = 32;  // glm3.quantization.BLOCK

struct Weight {
  const void *data = nullptr;
  const _Float16 *scales = nullptr;
  int kind = 0;  // 1 / 2 / 3 float (float_types.h), 8 int8, 4 packed int4
  int64_t group = 0;
};

// The weight of inputs i (data) and i + 1 (scales) for a product [*, k] -> [*, n]; 0 or an error code.
int weight_at(int i, int64_t n, int64_t k, void **params, int *ndims, int64_t **shapes, const char **dtypes,
              Weight &w) {
  if (ndims[i] != 2 || shapes[i][0] != n) return 1;
  w.data = params[i];
  w.kind = glm3::float_kind(dtypes[i]);
  if (w.kind != 0) return shapes[i][1] == k ? 0 : 1;
  if (std::strcmp(dtypes[i], "int8") == 0) {
    w.kind = 8;
  } else if (std::strcmp(dtypes[i], "uint8") == 0) {
    w.kind = 4;
  } else {
    return 2;
  }
  if (shapes[i][1] != (w.kind == 8 ? k : k / 2) || k % kQuantBlock != 0) return 1;
  if (std::strcmp(dtypes[i + 1], "float16") != 0) return 2;
  const int64_t groups = ndims[i + 1] == 2 ? shapes[i + 1][1] : 0;
  if (ndims[i + 1] != 2 || shapes[i + 1][0] != n || groups < 1 || k % groups != 0 || (k / groups) % kQuantBlock)
    return 1;
  w.scales = static_cast<const _Float16 *>(params[i + 1]);
  w.group = k / groups;
  return 0;
}

void product(const float *x, const Weight &w, float *y, int64_t m, int64_t k, int64_t n) {
  if (w.kind == 8 || w.kind == 4) {
    glm3::quantized_xwt(x, static_cast<const uint8_t *>(w.data), w.scales, w.kind, y, m, k, n, w.group);
  } else {
    glm3::float_xwt(x, w.data, w.kind, y, m, k, n);
  }
}

void add(const float *a, const float *b, float *out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

bool is(const char *dtype, const char *name) { return std::strcmp(dtype, name) == 0; }

}  // namespace

extern "C" int glm3_decode_layer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                 void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 22) return 1;
  for (int i : {0, 12, 13, 15, 16, 20, 21})
    if (!is(dtypes[i], "float32")) return 2;
  for (int i : {14, 17, 18, 19})
    if (!is(dtypes[i], "int32")) return 2;
  const int ln1 = glm3::float_kind(dtypes[1]), ln2 = glm3::float_kind(dtypes[7]);
  const int bias_kind = glm3::float_kind(dtypes[4]);
  if (ln1 == 0 || ln2 == 0 || bias_kind == 0) return 2;
  if (ndims[0] != 2 || ndims[1] != 1 || ndims[4] != 1 || ndims[7] != 1 || ndims[12] != 2 || ndims[13] != 2 ||
      ndims[14] != 1 || ndims[15] != 4 || ndims[16] != 4 || ndims[17] != 1 || ndims[18] != 2 || ndims[19] != 1 ||
      ndims[20] != 1 || shapes[20][0] != 4)
    return 1;
  const float *consts = static_cast<const float *>(params[20]);
  const float eps = consts[0], scale = consts[1];
  const int64_t heads = static_cast<int64_t>(consts[2]);
  const bool residual_from_norm = consts[3] != 0.f;
  const int64_t b = shapes[0][0], hidden = shapes[0][1], half = shapes[12][1], positions_total = shapes[12][0];
  const glm3::PagedCache cache = glm3::paged_cache(params, shapes, 15);
  const int64_t groups = cache.groups, d = cache.head_dim;
  const int64_t q_width = heads * d, qkv_width = (heads + 2 * groups) * d;
  for (int i : {15, 16})
    for (int a = 0; a < 4; ++a)
      if (shapes[i][a] != shapes[15][a]) return 1;
  if (heads < 1 || groups < 1 || heads % groups != 0 || shapes[1][0] != hidden || shapes[7][0] != hidden ||
      shapes[4][0] != qkv_width || shapes[13][0] != positions_total || shapes[13][1] != half || 2 * half > d ||
      shapes[14][0] != b || shapes[17][0] != b || shapes[18][0] != b || shapes[19][0] != b ||
      ndims[21] != 2 || shapes[21][0] != b || shapes[21][1] != hidden)
    return 1;
  Weight qkv, dense, up, down;
  int bad = weight_at(2, qkv_width, hidden, params, ndims, shapes, dtypes, qkv);
  if (!bad) bad = weight_at(5, hidden, q_width, params, ndims, shapes, dtypes, dense);
  const int64_t ffn2 = ndims[8] == 2 ? shapes[8][0] : 0;
  if (!bad && (ffn2 < 2 || ffn2 % 2 != 0)) bad = 1;
  if (!bad) bad = weight_at(8, ffn2, hidden, params, ndims, shapes, dtypes, up);
  if (!bad) bad = weight_at(10, hidden, ffn2 / 2, params, ndims, shapes, dtypes, down);
  if (bad) return bad;
  const int32_t *positions = static_cast<const int32_t *>(params[14]);
  for (int64_t r = 0; r < b; ++r)
    if (positions[r] < 0 || positions[r] >= positions_total) return 3;
  if (const int out_of_range = glm3::check_paged(cache, b)) return out_of_range;

  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[21]);
  const int64_t ffn = ffn2 / 2;
  thread_local std::vector<float> bias, normed, projected, rope, attended, residual, wide;
  bias.resize(qkv_width);
  for (int64_t i = 0; i < qkv_width; ++i) bias[i] = glm3::float_at(params[4], bias_kind, i);
  normed.resize(b * hidden);
  projected.resize(b * std::max(qkv_width, hidden));
  rope.resize(2 * b * half);
  attended.resize(b * std::max(q_width, ffn));
  residual.resize(b * hidden);
  wide.resize(b * ffn2);
  // The rotary tables' rows of each position.
  const float *cos_table = static_cast<const float *>(params[12]), *sin_table = static_cast<const float *>(params[13]);
  float *cos = rope.data(), *sin = rope.data() + b * half;
  for (int64_t r = 0; r < b; ++r) {
    std::memcpy(cos + r * half, cos_table + positions[r] * half, sizeof(float) * half);
    std::memcpy(sin + r * half, sin_table + positions[r] * half, sizeof(float) * half);
  }
  // Attention: x + dense(attention(rope(qkv(norm(x))))).
  glm3::rms_norm(x, params[1], ln1, eps, normed.data(), b, hidden);
  product(normed.data(), qkv, projected.data(), b, hidden, qkv_width);
  glm3::paged_decode(projected.data(), bias.data(), cos, sin, cache, b, heads, half, scale,
                     attended.data());
  product(attended.data(), dense, projected.data(), b, q_width, hidden);
  add(residual_from_norm ? normed.data() : x, projected.data(), residual.data(), b * hidden);
  // MLP: residual + down(swiglu(up(norm(residual)))).
  glm3::rms_norm(residual.data(), params[7], ln2, eps, normed.data(), b, hidden);
  product(normed.data(), up, wide.data(), b, hidden, ffn2);
  glm3::swiglu(wide.data(), attended.data(), b, ffn);
  product(attended.data(), down, projected.data(), b, ffn, hidden);
  add(residual_from_norm ? normed.data() : residual.data(), projected.data(), out, b * hidden);
  return 0;
}
