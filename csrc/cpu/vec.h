// A thin vector layer for the row kernels: fp32 / fp64 registers, loads that widen fp16 / bf16 /
// fp32 storage into fp32 lanes, stores that narrow with round-to-nearest-even, and fused
// multiply-add where the ISA has it.
//
// The implementation is chosen by the compiler flags of the object that includes it:
//   avx512_bf16: avx512 + -mavx512bf16 (native fp32 -> bf16 stores)
//   avx512: -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c  (16 fp32 / 8 fp64 lanes)
//   avx2:   -mavx2 -mfma -mf16c                                       (8 fp32 / 4 fp64 lanes)
//   scalar: no flags; plain arrays of 8 fp32 / 4 fp64 that the compiler vectorises for the
//           baseline of the target (SSE2 on x86-64, NEON on aarch64).
// Loads and stores are always unaligned, so results never depend on a pointer's alignment.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "convert.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#define LNEXT_VEC_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LNEXT_VEC_AVX2 1
#include <immintrin.h>
#endif

#define C10_LIKELY_LNEXT(x) __builtin_expect(!!(x), 1)

// For the per-vector helpers of the hot loops, which must not become calls when a kernel has
// many instantiations (GCC's inliner stops at its unit-growth limits; ATen: C10_ALWAYS_INLINE).
#if defined(__GNUC__)
#define LNEXT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LNEXT_ALWAYS_INLINE inline
#endif

namespace layernorm_ext::cpu {
inline namespace LNEXT_CPU_CAPABILITY {

// Scalar fused multiply-add with the same rounding as the vector lanes (a*b+c rounded once where
// the ISA fuses, twice on the portable path), so a row's tail is computed like its body.
inline float madd(float a, float b, float c) {
#if defined(LNEXT_VEC_AVX512) || defined(LNEXT_VEC_AVX2)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline double madd(double a, double b, double c) {
#if defined(LNEXT_VEC_AVX512) || defined(LNEXT_VEC_AVX2)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename A>
struct Vec;

#if defined(LNEXT_VEC_AVX512)

template <>
struct Vec<float> {
  static constexpr int kSize = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float s) { return {_mm512_set1_ps(s)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static Vec load(const BFloat16* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(BFloat16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits()); }
  // Non-temporal stores, for outputs much larger than the caches (no read-for-ownership of the
  // destination lines). p must be aligned to the store width (64 bytes fp32, 32 bytes 16-bit).
  void stream(float* p) const { _mm512_stream_ps(p, v); }
  void stream(Half* p) const {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void stream(BFloat16* p) const {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bf16_bits());
  }
  __m256i bf16_bits() const {
#if defined(__AVX512BF16__)
    // Native conversion (one instruction, round to nearest even). It treats subnormal inputs as
    // zero and keeps NaN payloads, where torch keeps subnormals and writes 0x7FC0; those lanes
    // are rare, so they take the exact integer path below. One vfpclassps finds them:
    // 0x01 QNaN | 0x80 SNaN | 0x20 subnormal.
    const __mmask16 slow = _mm512_fpclass_ps_mask(v, 0x01 | 0x80 | 0x20);
    if (C10_LIKELY_LNEXT(slow == 0)) {
      return (__m256i)_mm512_cvtneps_pbh(v);
    }
#endif
    // Round to nearest even in integer arithmetic (keeps subnormals, unlike vcvtneps2bf16),
    // then replace NaN lanes by the canonical 0x7FC0.
    const __m512i w = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(w, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  // The first n (0 <= n < kSize) elements; the other lanes read as zero and are not touched.
  static Vec load_partial(const float* p, int n) { return {_mm512_maskz_loadu_ps(mask(n), p)}; }
  static Vec load_partial(const Half* p, int n) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p))};
  }
  static Vec load_partial(const BFloat16* p, int n) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask(n), p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, mask(n), v); }
  void store_partial(Half* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n),
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store_partial(BFloat16* p, int n) const {
    _mm256_mask_storeu_epi16(p, mask(n), bf16_bits());
  }
  // Lanes >= n set to zero.
  Vec first(int n) const { return {_mm512_maskz_mov_ps(mask(n), v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  void store_lanes(float* out) const { _mm512_storeu_ps(out, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec madd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
};

#if !defined(__AVX512BF16__)
// Round to nearest even of fp32 values split into their high halves h (the truncated bf16) and
// low halves l, on 16-bit lanes: h plus the carry out of l + t, t = 0x7FFE | (h & 1), which is
// the top bit of vpavgw's (l + t + 1) >> 1.
inline __m512i bf16_round_halves(__m512i h, __m512i l) {
  // t = (h & 1) | 0x7FFE (vpternlogd: A & B | C).
  const __m512i t =
      _mm512_ternarylogic_epi32(h, _mm512_set1_epi16(1), _mm512_set1_epi16(0x7FFE), 0xEA);
  return _mm512_add_epi16(h, _mm512_srli_epi16(_mm512_avg_epu16(l, t), 15));
}

// Without AVX512-BF16, bf16 results are rounded and stored two vectors (32 elements, 64 bytes)
// at a time, the rounding running once on 16-bit lanes. With each element's fp32 bits split into
// a high half h (the truncated bf16) and a low half l, round to nearest even adds to h the carry
// out of l + 0x7FFF + (h & 1), as bf16_bits() does in 32-bit lanes (so the bits are the same):
// vpavgw computes (l + t + 1) >> 1 on 17 bits, whose top bit, for t = 0x7FFE | (h & 1), is that
// carry. Two vpermt2w gather the h and the l halves of both vectors in element order; NaN lanes
// become 0x7FC0 as in bf16_bits(). Per 32 elements that is about 12 instructions where two
// bf16_bits() take 18 (vpmovdw alone is two shuffle uops). Measured (harness, 1 thread, cycles
// per 16 elements, Xeon Skylake-SP): RMSNorm 512 x 4096 14.9 -> 12.9, LayerNorm 512 x 768
// 15.2 -> 13.6.
inline __m512i bf16_pair_bits(__m512 a, __m512 b) {
  alignas(64) static constexpr uint16_t kHigh[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                                     23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                                     45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  alignas(64) static constexpr uint16_t kLow[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                    22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                    44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i wa = _mm512_castps_si512(a);
  const __m512i wb = _mm512_castps_si512(b);
  const __m512i h = _mm512_permutex2var_epi16(wa, _mm512_load_si512(kHigh), wb);
  const __m512i l = _mm512_permutex2var_epi16(wa, _mm512_load_si512(kLow), wb);
  __m512i r = bf16_round_halves(h, l);
  const __mmask16 nan_a = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
  const __mmask16 nan_b = _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
  if (__builtin_expect((nan_a | nan_b) != 0, 0)) {
    r = _mm512_mask_mov_epi16(r, _mm512_kunpackw(nan_b, nan_a), _mm512_set1_epi16(0x7FC0));
  }
  return r;
}

// Even / odd layout of 32 bf16 values (64 bytes), for the apply pass without AVX512-BF16. One
// load gives both halves without a shuffle: element 2j is the low half of dword j (shifted up),
// element 2j + 1 its high half (low half cleared). Each element is then computed by the same
// operations as in element order, with parameters stored in the same layout (deinterleave_2l in
// norm_krnl.cpp), and bf16_even_odd_bits rounds and re-interleaves the results with shifts and
// vpternlogd where bf16_pair_bits needs two vpermt2w (3 uops each on Skylake-SP, two of them on
// the shuffle port) and the loads two vpmovzxwd.
inline void load_bf16_even_odd(const BFloat16* p, __m512& even, __m512& odd) {
  const __m512i u = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// bf16 bits of 32 results held as even / odd fp32 vectors, in element order: the same rounding
// (nearest even, NaN -> 0x7FC0) and so the same bits as bf16_pair_bits / bf16_bits().
// kCanonNaN = false leaves out the NaN test (two compares and a mask test per 32 elements), for
// callers that know no lane holds a NaN (apply_row's kFinite): the bits are then the same.
// vpternlogd overwrites its first operand, so each takes a temporary that dies there first
// (f = A | B & C, 0xF8), not a constant the loop keeps (which cost a register copy each).
template <bool kCanonNaN = true>
inline __m512i bf16_even_odd_bits(__m512 even, __m512 odd) {
  const __m512i we = _mm512_castps_si512(even);
  const __m512i wo = _mm512_castps_si512(odd);
  // h: the truncated bf16 of each element, l: the discarded low halves.
  const __m512i h = _mm512_ternarylogic_epi32(
      _mm512_srli_epi32(we, 16), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)), wo, 0xF8);
  const __m512i l =
      _mm512_ternarylogic_epi32(_mm512_slli_epi32(wo, 16), _mm512_set1_epi32(0x0000FFFF), we, 0xF8);
  __m512i r = bf16_round_halves(h, l);
  if constexpr (kCanonNaN) {
    const __mmask16 nan_e = _mm512_cmp_ps_mask(even, even, _CMP_UNORD_Q);
    const __mmask16 nan_o = _mm512_cmp_ps_mask(odd, odd, _CMP_UNORD_Q);
    if (__builtin_expect(!_mm512_kortestz(nan_e, nan_o), 0)) {
      r = _mm512_mask_ternarylogic_epi32(r, nan_e, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)),
                                         _mm512_set1_epi32(0x7FC0), 0xEA);
      r = _mm512_mask_ternarylogic_epi32(r, nan_o, _mm512_set1_epi32(0x0000FFFF),
                                         _mm512_set1_epi32(0x7FC00000), 0xEA);
    }
  }
  return r;
}
#else
// bf16 bits of 32 results a (elements 0-15) and b (16-31), in element order: one vcvtne2ps2bf16
// for both where no lane is a NaN or subnormal (the cases where it differs from torch, see
// bf16_bits()), else bf16_bits() for each, out of line. The same bits as two bf16_bits().
// Measured (microbenchmark, 1 thread, L1-resident, Intel Xeon with AMX, TSC cycles per 32
// elements, min of 15): two vcvtneps2bf16 with their vfpclassps tests 4.1-5.0, this 2.8-3.2.
[[gnu::noinline, gnu::cold]] inline __m512i bf16_pair_bits_exact(__m512 a, __m512 b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(Vec<float>{a}.bf16_bits()),
                            Vec<float>{b}.bf16_bits(), 1);
}
// Forced inline: GCC kept it out of line in the apply loop (a call per 32 elements, 18% slower
// than the two conversions it replaced).
LNEXT_ALWAYS_INLINE __m512i bf16_pair_bits(__m512 a, __m512 b) {
  const __mmask16 slow_a = _mm512_fpclass_ps_mask(a, 0x01 | 0x80 | 0x20);
  const __mmask16 slow_b = _mm512_fpclass_ps_mask(b, 0x01 | 0x80 | 0x20);
  if (C10_LIKELY_LNEXT(_kortestz_mask16_u8(slow_a, slow_b))) {
    return (__m512i)_mm512_cvtne2ps_pbh(b, a);
  }
  return bf16_pair_bits_exact(a, b);
}
#endif

template <>
struct Vec<double> {
  static constexpr int kSize = 8;
  __m512d v;
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec set1(double s) { return {_mm512_set1_pd(s)}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  static Vec load_partial(const double* p, int n) { return {_mm512_maskz_loadu_pd(mask(n), p)}; }
  void store_partial(double* p, int n) const { _mm512_mask_storeu_pd(p, mask(n), v); }
  Vec first(int n) const { return {_mm512_maskz_mov_pd(mask(n), v)}; }
  double sum() const { return _mm512_reduce_add_pd(v); }
  static __mmask8 mask(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  void store_lanes(double* out) const { _mm512_storeu_pd(out, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend Vec madd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
};

#elif defined(LNEXT_VEC_AVX2)

template <>
struct Vec<float> {
  static constexpr int kSize = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float s) { return {_mm256_set1_ps(s)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static Vec load(const BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(BFloat16* p) const {
    const __m256i w = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(w, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(w, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_srli_epi32(r, 16);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    // Narrow 8 x u32 (each < 2^16) to 8 x u16: pack within 128-bit halves, then gather them.
    const __m256i packed = _mm256_packus_epi32(r, r);
    const __m256i ordered = _mm256_permute4x64_epi64(packed, 0x08);  // qwords 0 and 2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(ordered));
  }
  // The first n (0 <= n < kSize) elements; the other lanes read as zero and are not touched.
  static Vec load_partial(const float* p, int n) { return {_mm256_maskload_ps(p, mask(n))}; }
  template <typename T>
  static Vec load_partial(const T* p, int n) {
    alignas(32) T tmp[kSize] = {};
    std::memcpy(tmp, p, sizeof(T) * n);
    return load(tmp);
  }
  void store_partial(float* p, int n) const { _mm256_maskstore_ps(p, mask(n), v); }
  template <typename T>
  void store_partial(T* p, int n) const {
    alignas(32) T tmp[kSize];
    store(tmp);
    std::memcpy(p, tmp, sizeof(T) * n);
  }
  Vec first(int n) const { return {_mm256_and_ps(v, _mm256_castsi256_ps(mask(n)))}; }
  float sum() const {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
  }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  void store_lanes(float* out) const { _mm256_storeu_ps(out, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec madd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
};

template <>
struct Vec<double> {
  static constexpr int kSize = 4;
  __m256d v;
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec set1(double s) { return {_mm256_set1_pd(s)}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  static Vec load_partial(const double* p, int n) { return {_mm256_maskload_pd(p, mask(n))}; }
  void store_partial(double* p, int n) const { _mm256_maskstore_pd(p, mask(n), v); }
  Vec first(int n) const { return {_mm256_and_pd(v, _mm256_castsi256_pd(mask(n)))}; }
  double sum() const {
    __m128d x = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  void store_lanes(double* out) const { _mm256_storeu_pd(out, v); }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend Vec madd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
};

#else  // portable

// Fixed-width arrays; every operation is an elementwise loop that -O3 turns into the target's
// baseline SIMD. No fused multiply-add: the baseline x86-64 has none, and emulating it is slow.
template <typename A, int W>
struct ArrayVec {
  static constexpr int kSize = W;
  A v[W];
  static ArrayVec zero() { return set1(A(0)); }
  static ArrayVec set1(A s) {
    ArrayVec r;
    for (int i = 0; i < W; ++i) r.v[i] = s;
    return r;
  }
  template <typename T>
  static ArrayVec load(const T* p) {
    ArrayVec r;
    for (int i = 0; i < W; ++i) r.v[i] = load_acc(p + i);
    return r;
  }
  template <typename T>
  void store(T* p) const {
    for (int i = 0; i < W; ++i) store_acc(p + i, v[i]);
  }
  template <typename T>
  static ArrayVec load_partial(const T* p, int n) {
    ArrayVec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = load_acc(p + i);
    return r;
  }
  template <typename T>
  void store_partial(T* p, int n) const {
    for (int i = 0; i < n; ++i) store_acc(p + i, v[i]);
  }
  ArrayVec first(int n) const {
    ArrayVec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = v[i];
    return r;
  }
  // Pairwise tree, like the SIMD versions.
  A sum() const {
    A t[W];
    for (int i = 0; i < W; ++i) t[i] = v[i];
    for (int w = W / 2; w >= 1; w /= 2) {
      for (int i = 0; i < w; ++i) t[i] += t[i + w];
    }
    return t[0];
  }
  void store_lanes(A* out) const {
    for (int i = 0; i < W; ++i) out[i] = v[i];
  }
#define LNEXT_ARRAYVEC_BINOP(op)                           \
  friend ArrayVec operator op(ArrayVec a, ArrayVec b) {    \
    ArrayVec r;                                            \
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] op b.v[i]; \
    return r;                                              \
  }
  LNEXT_ARRAYVEC_BINOP(+)
  LNEXT_ARRAYVEC_BINOP(-)
  LNEXT_ARRAYVEC_BINOP(*)
#undef LNEXT_ARRAYVEC_BINOP
  friend ArrayVec madd(ArrayVec a, ArrayVec b, ArrayVec c) {
    ArrayVec r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
};

template <>
struct Vec<float> : ArrayVec<float, 8> {
  Vec() = default;
  Vec(const ArrayVec<float, 8>& a)
      : ArrayVec<float, 8>(a) {}  // NOLINT(google-explicit-constructor)
};
template <>
struct Vec<double> : ArrayVec<double, 4> {
  Vec() = default;
  Vec(const ArrayVec<double, 4>& a)
      : ArrayVec<double, 4>(a) {}  // NOLINT(google-explicit-constructor)
};

#endif

template <typename V, typename T, typename = void>
struct HasStream : std::false_type {};
template <typename V, typename T>
struct HasStream<V, T, std::void_t<decltype(std::declval<const V&>().stream(std::declval<T*>()))>>
    : std::true_type {};

// Non-temporal store where the vector type has one (AVX-512), a plain store otherwise.
template <typename V, typename T>
inline void store_stream(const V& v, T* p) {
  if constexpr (HasStream<V, T>::value) {
    v.stream(p);
  } else {
    v.store(p);
  }
}

// Whether T is stored two vectors at a time (store_pair): bf16 on AVX-512, one rounding (or one
// native conversion) for 32 elements.
template <typename V, typename T>
constexpr bool kPairStores = false;

// a to p[0, L), b to p[L, 2L); kStream: non-temporal stores where the vector type has them.
template <bool kStream, typename V, typename T>
inline void store_pair(const V& a, const V& b, T* p) {
  if constexpr (kStream) {
    store_stream(a, p);
    store_stream(b, p + V::kSize);
  } else {
    a.store(p);
    b.store(p + V::kSize);
  }
}

#if defined(LNEXT_VEC_AVX512)
template <>
constexpr bool kPairStores<Vec<float>, BFloat16> = true;

// 64 bytes to p; kStream: non-temporal (p 64-byte aligned).
template <bool kStream>
inline void store_64(__m512i bits, void* p) {
  if constexpr (kStream) {
    _mm512_stream_si512(static_cast<__m512i*>(p), bits);
  } else {
    _mm512_storeu_si512(p, bits);
  }
}

// One rounding (one conversion with AVX512-BF16) for both vectors.
template <bool kStream>
inline void store_pair(const Vec<float>& a, const Vec<float>& b, BFloat16* p) {
  store_64<kStream>(bf16_pair_bits(a.v, b.v), p);
}
#endif

// The apply pass's even / odd layout (load_bf16_even_odd): bf16 on AVX-512 without AVX512-BF16.
// load: 2 * kSize values of p as the even and the odd elements; store: their bf16 bits back in
// element order (plain or, kStream, non-temporal to a 64-byte-aligned p; kCanonNaN = false where
// no lane can hold a NaN).
template <typename V, typename T>
struct EvenOdd {
  static constexpr bool kOn = false;
};

#if defined(LNEXT_VEC_AVX512) && !defined(__AVX512BF16__)
template <>
struct EvenOdd<Vec<float>, BFloat16> {
  static constexpr bool kOn = true;
  static void load(const BFloat16* p, Vec<float>& even, Vec<float>& odd) {
    load_bf16_even_odd(p, even.v, odd.v);
  }
  // kCanonNaN: see bf16_even_odd_bits.
  template <bool kStream, bool kCanonNaN = true>
  static void store(const Vec<float>& even, const Vec<float>& odd, BFloat16* p) {
    store_64<kStream>(bf16_even_odd_bits<kCanonNaN>(even.v, odd.v), p);
  }
};
#endif

// Asks for the cache line holding p to be brought into L2 (prefetcht1 on x86); never faults.
inline void prefetch_l2(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}

// Orders this thread's non-temporal stores before whatever follows (a no-op without them).
inline void stream_fence() {
#if defined(LNEXT_VEC_AVX512) || defined(LNEXT_VEC_AVX2)
  _mm_sfence();
#endif
}

}  // namespace LNEXT_CPU_CAPABILITY
}  // namespace layernorm_ext::cpu
