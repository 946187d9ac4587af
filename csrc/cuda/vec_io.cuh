// Device-side dtype plumbing: accumulation types, conversions, and pack loads / stores.
//
// Packs. Every kernel maps elements to threads in packs of P = 16 / sizeof(T) consecutive
// elements: slot (i, e) of a thread is pack i, element e. How a pack is moved is a separate,
// run-time choice made on the host (`width`, elements per memory access): 16-byte accesses only
// when every base pointer is aligned and N and every row stride divide by the pack, else the
// widest power of two that divides all of them (down to scalar accesses). The element -> thread
// mapping and the arithmetic never depend on `width`, so results are bitwise independent of
// alignment (reliability.md, F22).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernel_api.h"

namespace layernorm_ext::cuda {

// Statistics and all arithmetic in fp32, or fp64 for fp64 input.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr int kPackOf = 16 / static_cast<int>(sizeof(T));

// --- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----------

template <typename A>
__device__ __forceinline__ A to_acc(float v) {
  return static_cast<A>(v);
}
template <typename A>
__device__ __forceinline__ A to_acc(double v) {
  return static_cast<A>(v);
}
template <typename A>
__device__ __forceinline__ A to_acc(__half v) {
  return static_cast<A>(__half2float(v));
}
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 v) {
  return static_cast<A>(__bfloat162float(v));
}

// Round-to-nearest-even, once, from the accumulation type.
template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(double v) {
  static_assert(std::is_same_v<T, double>, "fp64 accumulation is only used for fp64 data");
  return v;
}

// 1 / sqrt(v): rsqrtf has a maximum error of 2 ulp (CUDA C Programming Guide, "Mathematical
// Functions"); the fp64 rsqrt has 1 ulp. Both are far inside the forward tolerances, and rstd is
// computed once per row. Never built with --use_fast_math: every other operation is IEEE.
__device__ __forceinline__ float acc_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double acc_rsqrt(double v) { return rsqrt(v); }

// Explicit fused multiply-adds where the formulas (and the CPU kernels) fuse; nvcc may contract
// other a * b + c too (its default), which no exactness property depends on.
__device__ __forceinline__ float acc_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double acc_fma(double a, double b, double c) {
  return __fma_rn(a, b, c);
}

// a * b rounded on its own, never contracted into a following add (nvcc fuses a * b + c into an
// FMA by default): the fused residual gradient is dx + grad_residual with dx's product rounded
// first, as the CPU kernels compute it (and as the unfused dx, then add, would for fp32 / fp64).
__device__ __forceinline__ float acc_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double acc_mul(double a, double b) { return __dmul_rn(a, b); }

// --- packs -------------------------------------------------------------------------------------

template <typename T, int P>
struct alignas(sizeof(T) * P >= 16 ? 16 : sizeof(T) * P) Pack {
  T v[P];
};

template <int kBytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<2> {
  using type = unsigned short;
};

// Moves W consecutive elements with the widest accesses their size allows (at most 16 bytes
// each). Both sides must be aligned to min(16, W * sizeof(T)) bytes.
template <typename T, int W>
__device__ __forceinline__ void move_elems(T* dst, const T* src) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * W;
  constexpr int kWord = kBytes < 16 ? kBytes : 16;
  using Wd = typename Word<kWord>::type;
#pragma unroll
  for (int i = 0; i < kBytes / kWord; ++i) {
    reinterpret_cast<Wd*>(dst)[i] = reinterpret_cast<const Wd*>(src)[i];
  }
}

// Copies the first `valid` elements of a pack (0 < valid <= P, a multiple of `width`) in
// accesses of `width` elements. `width` is uniform across the grid, so the branch is too.
template <typename T, int P, int W = P>
__device__ __forceinline__ void copy_prefix(T* dst, const T* src, int width, int valid) {
  if constexpr (W == 1) {
#pragma unroll
    for (int e = 0; e < P; ++e) {
      if (e < valid) dst[e] = src[e];
    }
  } else {
    if (width == W) {
#pragma unroll
      for (int c = 0; c < P; c += W) {
        if (c < valid) move_elems<T, W>(dst + c, src + c);
      }
    } else {
      copy_prefix<T, P, W / 2>(dst, src, width, valid);
    }
  }
}

// Loads a pack from global memory; elements at or past `valid` are left as they were.
template <typename T, int P>
__device__ __forceinline__ void load_pack(Pack<T, P>& dst, const T* src, int width, int valid) {
  if (valid == P && width == P) {
    move_elems<T, P>(dst.v, src);
  } else {
    copy_prefix<T, P>(dst.v, src, width, valid);
  }
}

// Stores the first `valid` elements of a pack to global memory.
template <typename T, int P>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, P>& src, int width, int valid) {
  if (valid == P && width == P) {
    move_elems<T, P>(dst, src.v);
  } else {
    copy_prefix<T, P>(dst, src.v, width, valid);
  }
}

// Widens a pack to the accumulation type.
template <typename A, typename T, int P>
__device__ __forceinline__ void widen(const Pack<T, P>& in, A (&out)[P]) {
#pragma unroll
  for (int e = 0; e < P; ++e) out[e] = to_acc<A>(in.v[e]);
}

// A zero pack (value-initialised: all bits zero, which is +0 for every dtype used here).
template <typename T, int P>
__device__ __forceinline__ Pack<T, P> zero_pack() {
  Pack<T, P> p;
#pragma unroll
  for (int e = 0; e < P; ++e) p.v[e] = from_acc<T>(acc_t<T>(0));
  return p;
}

// Fused residual add: s = a + b elementwise in the accumulation type, rounded once to T (torch's
// add, and cpu/norm_krnl.cpp's add_row). Elements past the valid ones are zero in both packs
// (zero_pack) and stay zero.
template <typename T, int P>
__device__ __forceinline__ Pack<T, P> add_packs(const Pack<T, P>& a, const Pack<T, P>& b) {
  using A = acc_t<T>;
  Pack<T, P> s;
#pragma unroll
  for (int e = 0; e < P; ++e) s.v[e] = from_acc<T>(to_acc<A>(a.v[e]) + to_acc<A>(b.v[e]));
  return s;
}

// Number of valid elements of the pack starting at column `col` of a row of N elements.
__device__ __forceinline__ int pack_valid(int64_t col, int64_t N, int P) {
  const int64_t left = N - col;
  return left <= 0 ? 0 : (left >= P ? P : static_cast<int>(left));
}

// The effective weight of an element.
template <WMode kW, typename A>
__device__ __forceinline__ A effective_weight(A w) {
  if constexpr (kW == WMode::kPlusOne) {
    return w + A(1);
  } else {
    return w;
  }
}

}  // namespace layernorm_ext::cuda
