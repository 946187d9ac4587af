// Forward kernels (LayerNorm and RMSNorm), included only by the inst/fwd_*.cu units.
//
// Numerics (kernels.md §1, mirrored from cpu/norm_krnl.cpp):
//  * statistics in the accumulation type A (fp32; fp64 for fp64 input);
//  * LayerNorm: each thread runs Welford over its own elements in slot order, then the row group
//    merges the threads' (mean, m2, n) with Chan's formula (reduce.cuh); RMSNorm: each thread sums
//    squares in slot order, then the group adds the sums;
//  * rstd = rsqrt(var + eps) (see acc_rsqrt), var clamped at 0 in a way that keeps NaN;
//  * y = ((x - mean) * rstd) * w + b in A, rounded once to the output dtype. Never folded into
//    x * scale + shift, so a constant row (and N == 1) gives exactly b.
//  * fused residual add (p.residual != null, a run-time choice: no extra instantiations): the
//    thread that owns an element loads x and residual, forms s = x + residual in A, rounds it
//    once to T (add_packs), stores it to residual_out and from then on uses the rounded s in place
//    of x. The norm therefore sees exactly the values of residual_out: y is bitwise the plain
//    norm of residual_out, the same element -> thread mapping and the same arithmetic.
//    In the in-place form residual_out is residual: each element is read, then written, by the
//    same thread, and never read by another thread. The pointers may alias, so the compiler
//    cannot move a load above a residual_out store: the register tier issues every load of the
//    row before its first store; the sweep tier its U x packs, then the residual packs in two
//    halves (all U at once would lift the sweep kernels from <= 64 to 72+ registers on sm_90,
//    i.e. from 2 resident 512-thread blocks per SM to 1, for the plain norm too).
//
// Assumptions (checked by the launcher): N >= 1 and M >= 1; every pointer, N and every row stride
// are compatible with p.width (vec_io.cuh); register tier: N <= threads per row * kPacks * P.
#pragma once

#include <type_traits>

#include "kernel_api.h"
#include "reduce.cuh"
#include "vec_io.cuh"

namespace layernorm_ext::cuda {
// Internal linkage: each instantiation unit owns the kernels it instantiates and hands out their
// addresses through its FwdKernelSet function, so no kernel is ever defined in two objects.
namespace {

// Welford over the first `valid` elements of one thread's slots, in slot order. `first` is the
// number of elements this thread has already folded in (a compile-time constant in the register
// tier), so every reciprocal 1 / (k + 1) is a constant: no division per element.
template <typename A, int P>
__device__ __forceinline__ void welford_pack(Welford<A>& s, const A (&v)[P], int valid, int first) {
#pragma unroll
  for (int e = 0; e < P; ++e) {
    if (e < valid) {
      const A d = v[e] - s.mean;
      s.mean = acc_fma(d, A(1) / static_cast<A>(first + e + 1), s.mean);
      s.m2 = acc_fma(d, v[e] - s.mean, s.m2);
      s.n = first + e + 1;
    }
  }
}

// y for the first `valid` elements of one pack.
// Scalar math: xhat = (x - mean) * rstd (RMSNorm: x * rstd); y = xhat * w + b.
template <Kind K, WMode kW, bool kB, typename A, typename T, typename Pt, int P>
__device__ __forceinline__ void apply_pack(const A (&v)[P], const Pt* w, const Pt* b, T* y,
                                           int width, int valid, A mean, A rstd) {
  Pack<Pt, P> wp = zero_pack<Pt, P>();
  Pack<Pt, P> bp = zero_pack<Pt, P>();
  if constexpr (kW != WMode::kNone) load_pack(wp, w, width, valid);
  if constexpr (kB) load_pack(bp, b, width, valid);
  Pack<T, P> out;
#pragma unroll
  for (int e = 0; e < P; ++e) {
    const A xhat = K == Kind::kLayerNorm ? (v[e] - mean) * rstd : v[e] * rstd;
    A o = xhat;
    if constexpr (kW != WMode::kNone) {
      const A wv = effective_weight<kW>(to_acc<A>(wp.v[e]));
      o = kB ? acc_fma(xhat, wv, to_acc<A>(bp.v[e])) : xhat * wv;
    } else if constexpr (kB) {
      o = xhat + to_acc<A>(bp.v[e]);
    }
    out.v[e] = from_acc<T>(o);
  }
  store_pack(y, out, width, valid);
}

// m2 / N as m2 * (1 / N) (one more rounding than the CPU's m2 / n; see count_ratio for why no
// division here), clamped at 0 in a way that keeps NaN (welford_variance's rule).
template <typename A>
__device__ __forceinline__ A clamped_variance(A m2, A inv_n) {
  const A var = m2 * inv_n;
  return var < A(0) ? A(0) : var;
}

template <typename A>
__device__ __forceinline__ void write_stats(const FwdParams& p, int64_t row, A mean, A rstd) {
  if (p.mean != nullptr) static_cast<A*>(p.mean)[row] = mean;
  if (p.rstd != nullptr) static_cast<A*>(p.rstd)[row] = rstd;
}

// Scratch for one block reduction: Welford states (LayerNorm) or single sums (RMSNorm).
template <typename A>
struct alignas(16) ReduceScratch {
  unsigned char bytes[(kMaxWarps + 1) * sizeof(Welford<A>)];
  __device__ Welford<A>* welford() { return reinterpret_cast<Welford<A>*>(bytes); }
  __device__ A (*sums())[1] { return reinterpret_cast<A(*)[1]>(bytes); }
};

// --- Register tier ------------------------------------------------------------------------------
//
// A row group (2^k <= warp threads, several rows per block; or the whole block, one row per block)
// holds its row in registers: thread `lane` owns packs i * group + lane, i < kPacks, so a warp's
// accesses are contiguous. HBM is read once. A grid-stride loop over row groups covers any M.
//
// Registers: a block keeps its loads in flight only until its row reduction, so the bytes in
// flight per SM are the resident rows' bytes, set by the registers per thread. Left to ptxas
// under the (512, 1) launch bounds, the 16-bit kernels with 4 packs per thread take 84-85
// registers on sm_90 (weight and bias: the parameter packs are hoisted): 5 blocks of 128
// threads, i.e. 5 rows of 8 KB at N = 4096, per SM. Capped at 80 they take 68-72 registers
// without spilling (-Xptxas -v, every 16-bit instantiation, sm_80 ... sm_90) and 7 blocks fit:
// H200, bf16 with weight and bias, 4096 x 4096 38.9 -> 34.6 us, 32768 x 4096 251.7 -> 222.9 us,
// 4096 x 8192 81.1 -> 65.2 us (0.45 -> 0.55 of a copy's bandwidth; two runs, same session type).
// sm_100 and newer spill a few bytes under that cap and were not measured: they keep the bounds.
template <typename T>
constexpr int fwd_reg_cap() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
  return 128;
#else
  return sizeof(T) == 2 ? 80 : 128;  // 128: what the (512, 1) bounds allow anyway
#endif
}
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define LNEXT_FWD_REG_CAP(T) __maxnreg__(fwd_reg_cap<T>())
#else
#define LNEXT_FWD_REG_CAP(T)  // __maxnreg__ needs CUDA 12.4: the launch bounds alone
#endif

template <Kind K, WMode kW, bool kB, typename T, typename Pt, int kPacks>
__global__ void __launch_bounds__(kRegMaxThreads, 1) LNEXT_FWD_REG_CAP(T)
    fwd_register_kernel(const FwdParams p) {
  using A = acc_t<T>;
  constexpr int P = kPackOf<T>;
  __shared__ ReduceScratch<A> scratch;
  const Group g = make_group(p.log2_group);
  const int N = static_cast<int>(p.N);  // <= kRegMaxThreads * kPacks * P here
  const T* x = static_cast<const T*>(p.x);
  const Pt* w = static_cast<const Pt*>(p.weight);
  const Pt* b = static_cast<const Pt*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const T* res = static_cast<const T*>(p.residual);
  T* res_out = static_cast<T*>(p.residual_out);
  const A eps = static_cast<A>(p.eps);
  // Divisions before any row is live: the IEEE division calls a slow-path subroutine.
  const A inv_n = A(1) / static_cast<A>(N);

  const int64_t step = static_cast<int64_t>(gridDim.x) * g.count;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * g.count; base < p.M; base += step) {
    const int64_t row = base + g.index;
    const bool active = row < p.M;
    // The row stays in registers in its storage type (half the registers of fp32 values for
    // 16-bit input) and is widened where it is used.
    int valid[kPacks];
    Pack<T, P> raw[kPacks];
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int col = (i * g.size + g.lane) * P;
      valid[i] = active ? pack_valid(col, N, P) : 0;
      raw[i] = zero_pack<T, P>();
      if (valid[i] > 0) load_pack(raw[i], x + row * p.x_stride + col, p.width, valid[i]);
    }
    if (res != nullptr) {
      // Fused residual add: every load first, then s = x + residual rounded to T, stored to
      // residual_out; raw then holds s, which is what gets normalised.
      Pack<T, P> rp[kPacks];
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        const int col = (i * g.size + g.lane) * P;
        rp[i] = zero_pack<T, P>();
        if (valid[i] > 0) load_pack(rp[i], res + row * p.residual_stride + col, p.width, valid[i]);
      }
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        if (valid[i] > 0) {
          const int col = (i * g.size + g.lane) * P;
          raw[i] = add_packs(raw[i], rp[i]);
          store_pack(res_out + row * p.residual_out_stride + col, raw[i], p.width, valid[i]);
        }
      }
    }

    A mean = A(0);
    A rstd;
    if constexpr (K == Kind::kLayerNorm) {
      Welford<A> s{A(0), A(0), 0};
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        A v[P];
        widen(raw[i], v);
        welford_pack(s, v, valid[i], i * P);
      }
      s = group_welford(s, g, scratch.welford());
      mean = s.mean;
      rstd = acc_rsqrt(clamped_variance(s.m2, inv_n) + eps);
    } else {
      A ss[1] = {A(0)};
#pragma unroll
      for (int i = 0; i < kPacks; ++i) {
        A v[P];
        widen(raw[i], v);
#pragma unroll
        for (int e = 0; e < P; ++e) {
          if (e < valid[i]) ss[0] = acc_fma(v[e], v[e], ss[0]);
        }
      }
      group_sum<A, 1>(ss, g, scratch.sums());
      rstd = acc_rsqrt(ss[0] * inv_n + eps);
    }
    if (!active) {
      continue;  // nothing below synchronises
    }
    if (g.lane == 0) write_stats(p, row, mean, rstd);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      if (valid[i] > 0) {
        const int col = (i * g.size + g.lane) * P;
        A v[P];
        widen(raw[i], v);
        apply_pack<K, kW, kB>(v, w + col, b + col, y + row * p.y_stride + col, p.width, valid[i],
                              mean, rstd);
      }
    }
  }
}

// --- Sweep tier ---------------------------------------------------------------------------------
//
// Block per row (grid-stride over rows). Thread t owns packs t, t + B, t + 2B, ... (B threads).
// Sweep 1 reads them (kSweepUnroll packs in flight), folds each pack's Welford state (or sum of
// squares) into the thread's, and, when p.cache, parks the raw pack in shared memory; the block
// merges. Sweep 2 re-reads the same packs (from shared memory, or from global memory / L2) and
// writes y. Each thread re-reads only the packs it parked itself, so the cache needs no barrier,
// and the arithmetic is the same with or without it.
// Fused residual add: sweep 1 reads x and residual, stores s (rounded) to residual_out and parks /
// folds s; sweep 2 re-reads s from the cache or from residual_out (never x + residual again: in
// the in-place form residual has been overwritten by then). The same thread wrote those packs in
// sweep 1 (same pack -> thread mapping), so its own earlier stores are what it reads.
template <Kind K, WMode kW, bool kB, typename T, typename Pt>
__global__ void __launch_bounds__(kSweepThreads, 1) fwd_sweep_kernel(const FwdParams p) {
  using A = acc_t<T>;
  constexpr int P = kPackOf<T>;
  constexpr int U = kSweepUnroll;
  extern __shared__ uint4 dynamic_smem[];
  Pack<T, P>* cache = reinterpret_cast<Pack<T, P>*>(dynamic_smem);
  __shared__ ReduceScratch<A> scratch;
  const int64_t N = p.N;
  const int64_t packs = (N + P - 1) / P;
  const int64_t B = blockDim.x;
  const T* x = static_cast<const T*>(p.x);
  const Pt* w = static_cast<const Pt*>(p.weight);
  const Pt* b = static_cast<const Pt*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const T* res = static_cast<const T*>(p.residual);
  T* res_out = static_cast<T*>(p.residual_out);
  const A eps = static_cast<A>(p.eps);
  const A inv_n = A(1) / static_cast<A>(N);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = x + row * p.x_stride;
    // Fused add: the row that is normalised is residual_out's (sweep 2 re-reads it there).
    T* sr = res != nullptr ? res_out + row * p.residual_out_stride : nullptr;
    const T* resr = res != nullptr ? res + row * p.residual_stride : nullptr;
    Welford<A> s{A(0), A(0), 0};
    A ss[1] = {A(0)};
    for (int64_t j0 = threadIdx.x; j0 < packs; j0 += U * B) {
      Pack<T, P> raw[U];
      int valid[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * B;
        valid[u] = j < packs ? pack_valid(j * P, N, P) : 0;
        raw[u] = zero_pack<T, P>();
        if (valid[u] > 0) load_pack(raw[u], xr + j * P, p.width, valid[u]);
      }
      if (resr != nullptr) {
        // The residual in two halves after the U x packs (see the top of the file).
        constexpr int H = U / 2;
        static_assert(H >= 1 && U % H == 0, "the residual halves need an even unroll");
#pragma unroll
        for (int h = 0; h < U; h += H) {
          Pack<T, P> rp[H];
#pragma unroll
          for (int u = 0; u < H; ++u) {
            const int64_t j = j0 + (h + u) * B;
            rp[u] = zero_pack<T, P>();
            if (valid[h + u] > 0) load_pack(rp[u], resr + j * P, p.width, valid[h + u]);
          }
#pragma unroll
          for (int u = 0; u < H; ++u) {
            if (valid[h + u] == 0) continue;
            const int64_t j = j0 + (h + u) * B;
            raw[h + u] = add_packs(raw[h + u], rp[u]);
            store_pack(sr + j * P, raw[h + u], p.width, valid[h + u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (valid[u] == 0) continue;
        if (p.cache) cache[j0 + u * B] = raw[u];
        A v[P];
        widen(raw[u], v);
        if constexpr (K == Kind::kLayerNorm) {
          Welford<A> t{A(0), A(0), 0};
          welford_pack(t, v, valid[u], 0);
          s = chan_merge(s, t);
        } else {
#pragma unroll
          for (int e = 0; e < P; ++e) {
            if (e < valid[u]) ss[0] = acc_fma(v[e], v[e], ss[0]);
          }
        }
      }
    }

    A mean = A(0);
    A rstd;
    if constexpr (K == Kind::kLayerNorm) {
      s = block_welford(s, scratch.welford());
      mean = s.mean;
      rstd = acc_rsqrt(clamped_variance(s.m2, inv_n) + eps);
    } else {
      block_sum<A, 1>(ss, scratch.sums());
      rstd = acc_rsqrt(ss[0] * inv_n + eps);
    }
    if (threadIdx.x == 0) write_stats(p, row, mean, rstd);

    T* yr = y + row * p.y_stride;
    const T* src = sr != nullptr ? sr : xr;  // what sweep 2 re-reads without the cache
    for (int64_t j0 = threadIdx.x; j0 < packs; j0 += U * B) {
      Pack<T, P> raw[U];
      int valid[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * B;
        valid[u] = j < packs ? pack_valid(j * P, N, P) : 0;
        raw[u] = zero_pack<T, P>();
        if (valid[u] > 0) {
          if (p.cache) {
            raw[u] = cache[j];
          } else {
            load_pack(raw[u], src + j * P, p.width, valid[u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (valid[u] == 0) continue;
        const int64_t col = (j0 + u * B) * P;
        A v[P];
        widen(raw[u], v);
        apply_pack<K, kW, kB>(v, w + col, b + col, yr + col, p.width, valid[u], mean, rstd);
      }
    }
  }
}

// --- Kernel sets
// ----------------------------------------------------------------------------------

template <Kind K, WMode kW, bool kB, typename T, typename Pt>
FwdKernelSet fwd_set() {
  constexpr int kMaxPacks = fwd_max_packs(sizeof(T));
  static_assert(kMaxPacks == 4, "register tier instantiates 1, 2 and 4 packs");
  FwdKernelSet s{};
  s.reg[0] = kernel_entry(&fwd_register_kernel<K, kW, kB, T, Pt, 1>);
  s.reg[1] = kernel_entry(&fwd_register_kernel<K, kW, kB, T, Pt, 2>);
  s.reg[2] = kernel_entry(&fwd_register_kernel<K, kW, kB, T, Pt, 4>);
  s.sweep = kernel_entry(&fwd_sweep_kernel<K, kW, kB, T, Pt>);
  return s;
}

// All (weight mode, bias) variants of one kind and dtype pair. Mixed-dtype calls always have a
// parameter (otherwise they are not mixed), and RMSNorm has no bias: those sets stay empty.
template <Kind K, typename T, typename Pt>
FwdKernelSet make_fwd_set(WMode wmode, bool has_bias) {
  constexpr bool kMixed = !std::is_same_v<T, Pt>;
  if constexpr (K == Kind::kRMSNorm) {
    switch (wmode) {
      case WMode::kNone:
        if constexpr (kMixed) {
          return {};
        } else {
          return fwd_set<K, WMode::kNone, false, T, Pt>();
        }
      case WMode::kPlain:
        return fwd_set<K, WMode::kPlain, false, T, Pt>();
      case WMode::kPlusOne:
        return fwd_set<K, WMode::kPlusOne, false, T, Pt>();
    }
  } else {
    switch (wmode) {
      case WMode::kNone:
        if (has_bias) return fwd_set<K, WMode::kNone, true, T, Pt>();
        if constexpr (kMixed) {
          return {};
        } else {
          return fwd_set<K, WMode::kNone, false, T, Pt>();
        }
      case WMode::kPlain:
        return has_bias ? fwd_set<K, WMode::kPlain, true, T, Pt>()
                        : fwd_set<K, WMode::kPlain, false, T, Pt>();
      case WMode::kPlusOne:
        return has_bias ? fwd_set<K, WMode::kPlusOne, true, T, Pt>()
                        : fwd_set<K, WMode::kPlusOne, false, T, Pt>();
    }
  }
  return {};
}

}  // namespace
}  // namespace layernorm_ext::cuda

// Defines the FwdKernelSet function NAME (declared in kernel_api.h) for one kind and dtype pair.
#define LNEXT_DEFINE_FWD_KERNELS(NAME, KIND, T, PT)    \
  namespace layernorm_ext::cuda {                      \
  FwdKernelSet NAME(WMode wmode, bool has_bias) {      \
    return make_fwd_set<KIND, T, PT>(wmode, has_bias); \
  }                                                    \
  }
