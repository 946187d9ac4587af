// Scalar storage types and exact conversions for fp16 / bf16, without torch headers.
//
// Both conversions round to nearest-even exactly like c10::Half / c10::BFloat16, so a value
// stored by our kernels is bitwise the value torch would store for the same fp32 result.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef LNEXT_CPU_CAPABILITY
#error "convert.h is for the per-ISA kernel objects, which define LNEXT_CPU_CAPABILITY"
#endif

namespace layernorm_ext::cpu {

// Layout-compatible with c10::Half and c10::BFloat16 (a single uint16_t).
struct Half {
  uint16_t x;
};
struct BFloat16 {
  uint16_t x;
};

// Functions live in a namespace per ISA so that each object keeps its own copies.
inline namespace LNEXT_CPU_CAPABILITY {

inline float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof(w));
  return w;
}

// bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
inline float to_float(BFloat16 h) { return bits_to_float(static_cast<uint32_t>(h.x) << 16); }

// fp32 -> bf16, round to nearest even; NaN becomes the canonical quiet NaN 0x7FC0 (as c10).
// Subnormal results are kept (AVX512-BF16's vcvtneps2bf16 would flush them to zero, which is
// why no path here uses it).
inline BFloat16 to_bfloat16(float f) {
  if (f != f) {
    return BFloat16{0x7FC0};
  }
  const uint32_t w = float_to_bits(f);
  const uint32_t rounding_bias = ((w >> 16) & 1u) + 0x7FFFu;
  return BFloat16{static_cast<uint16_t>((w + rounding_bias) >> 16)};
}

// fp16 <-> fp32 by the branch-free IEEE algorithms of the FP16 library (also used by c10::Half).
inline float to_float(Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < denormalized_cutoff ? float_to_bits(denormalized)
                                                              : float_to_bits(normalized));
  return bits_to_float(result);
}

inline Half to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const float abs_f = bits_to_float(w & 0x7FFFFFFFu);
  float base = (abs_f * scale_to_inf) * scale_to_zero;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) {
    bias = 0x71000000u;
  }
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

// Uniform scalar access used by the kernels' tails: load as the accumulation type, store from it.
inline float load_acc(const float* p) { return *p; }
inline double load_acc(const double* p) { return *p; }
inline float load_acc(const Half* p) { return to_float(*p); }
inline float load_acc(const BFloat16* p) { return to_float(*p); }

inline void store_acc(float* p, float v) { *p = v; }
inline void store_acc(double* p, double v) { *p = v; }
inline void store_acc(Half* p, float v) { *p = to_half(v); }
inline void store_acc(BFloat16* p, float v) { *p = to_bfloat16(v); }

}  // namespace LNEXT_CPU_CAPABILITY
}  // namespace layernorm_ext::cpu
