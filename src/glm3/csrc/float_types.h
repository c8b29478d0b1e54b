// The floating-point storage types glm3's kernels read (float32, float16, bfloat16), shared by the sources of
// this directory.
#pragma once

#include <cstdint>
#include <cstring>

namespace glm3 {

// 1, 2, 3 for MindSpore's dtype names "float32", "float16", "bfloat16"; 0 for any other.
inline int float_kind(const char *dtype) {
  if (std::strcmp(dtype, "float32") == 0) return 1;
  if (std::strcmp(dtype, "float16") == 0) return 2;
  if (std::strcmp(dtype, "bfloat16") == 0) return 3;
  return 0;
}

// A bfloat16 value (its bits) as float32: exact.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// Element i of a float array of kind `kind` (float_kind) as float32.
inline float float_at(const void *data, int kind, int64_t i) {
  if (kind == 1) return static_cast<const float *>(data)[i];
  if (kind == 2) return static_cast<float>(static_cast<const _Float16 *>(data)[i]);
  return bf16_to_float(static_cast<const uint16_t *>(data)[i]);
}

}  // namespace glm3
