// Welford moments and Chan's pairwise merge, shared by the CPU and CUDA kernels.
//
// Why Welford and not E[x^2] - E[x]^2: the latter cancels catastrophically for rows with a large
// mean and a small spread (pytorch#51102: randn + 2000 gives variance 48,425), and can even go
// negative and turn into NaN. Welford's running (mean, m2) keeps the error linear in the row's
// condition number kappa = (|mean| + std) / std.
//
// This header is deliberately free of torch includes: the CPU row kernels are compiled once per ISA
// as plain C++ translation units, and the CUDA kernels include it from device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LNEXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LNEXT_HOST_DEVICE inline
#endif

namespace layernorm_ext {
// The per-ISA CPU objects each define LNEXT_CPU_CAPABILITY; an inline namespace per ISA keeps the
// linker from merging an AVX-512 instantiation with the baseline one (ATen's CPU_CAPABILITY trick).
#ifdef LNEXT_CPU_CAPABILITY
inline namespace LNEXT_CPU_CAPABILITY {
#endif

// Running statistics of `n` values: their mean and the sum of squared deviations from it.
// The count is an integer so that it stays exact far beyond 2^24 elements.
template <typename T>
struct Welford {
  T mean;
  T m2;
  int64_t n;
};

// Chan et al.'s merge of two disjoint sets. Either side may be empty (n == 0): that happens for
// tail threads / lanes that own no element, and must not inject a phantom zero into the moments
// (linkedin/Liger-Kernel#519).
template <typename T>
LNEXT_HOST_DEVICE Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.n == 0) {
    return a;
  }
  if (a.n == 0) {
    return b;
  }
  const int64_t n = a.n + b.n;
  const T nb_over_n = static_cast<T>(b.n) / static_cast<T>(n);
  const T delta = b.mean - a.mean;
  Welford<T> out;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<T>(a.n) * nb_over_n;
  out.n = n;
  return out;
}

// Population variance with a clamp that keeps NaN: `var < 0 ? 0 : var` is false for NaN, so a NaN
// row stays NaN (fmax would silently turn it into 0).
template <typename T>
LNEXT_HOST_DEVICE T welford_variance(T m2, int64_t n) {
  const T var = m2 / static_cast<T>(n);
  return var < T(0) ? T(0) : var;
}

#ifdef LNEXT_CPU_CAPABILITY
}  // namespace LNEXT_CPU_CAPABILITY
#endif
}  // namespace layernorm_ext
