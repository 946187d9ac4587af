// Row reductions on the GPU: Welford / Chan merges (LayerNorm) and plain sums (RMSNorm, and the
// backward's pair of sums) over a row group, which is either an aligned segment of 1..warp lanes
// (shuffle butterfly only) or a whole block (shuffles, then warp results through shared memory).
//
// Determinism: every reduction has one fixed shape that depends only on the group size, and all
// lanes of a group end with bitwise the same value, so a row's result never depends on which
// block, warp or position in the grid computed it.
#pragma once

#include <c10/macros/Macros.h>

#include <type_traits>

#include "../welford.h"
#include "kernel_api.h"

namespace layernorm_ext::cuda {

constexpr int kWarpSize = C10_WARP_SIZE;
// __shfl_*_sync masks name the lanes of a CUDA warp, which is 32 lanes wide.
static_assert(kWarpSize == 32, "the shuffle masks below assume 32-lane warps");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxWarps =
    (kRegMaxThreads > kSweepThreads ? kRegMaxThreads : kSweepThreads) / kWarpSize;
static_assert(kMaxWarps <= kWarpSize, "a block reduction merges at most one value per lane");

// The threads that share one row.
struct Group {
  int size;    // threads per row
  int lane;    // this thread's index within the group
  int index;   // the group's index within the block
  int count;   // groups per block
  int width;   // shuffle width: the group size, or the warp for a block group
  bool block;  // one group per block (size == blockDim.x, a whole number of warps)
};

// log2_group >= 0: groups of 2^log2_group (<= warp) consecutive threads; -1: the whole block.
__device__ __forceinline__ Group make_group(int log2_group) {
  Group g;
  if (log2_group < 0) {
    g.size = static_cast<int>(blockDim.x);
    g.lane = static_cast<int>(threadIdx.x);
    g.index = 0;
    g.count = 1;
    g.width = kWarpSize;
    g.block = true;
  } else {
    g.size = 1 << log2_group;
    g.lane = static_cast<int>(threadIdx.x) & (g.size - 1);
    g.index = static_cast<int>(threadIdx.x) >> log2_group;
    g.count = static_cast<int>(blockDim.x) >> log2_group;
    g.width = g.size;
    g.block = false;
  }
  return g;
}

// nb / n for the merge weight of two non-empty sets. fp32 uses the approximate division (at most 2
// ulp for divisors below 2^126; counts are far smaller): the IEEE division calls a slow-path
// subroutine, around which the caller must spill every live register, i.e. a whole row held in
// registers. Deterministic either way (one fixed instruction sequence).
template <typename A>
__device__ __forceinline__ A count_ratio(int64_t nb, int64_t n) {
  if constexpr (std::is_same_v<A, float>) {
    return __fdividef(static_cast<float>(nb), static_cast<float>(n));
  } else {
    return static_cast<double>(nb) / static_cast<double>(n);
  }
}

// Chan et al.'s merge of two disjoint sets; the device twin of welford.h's welford_merge (same
// formula, same n == 0 guards), with the weight from count_ratio.
template <typename A>
__device__ __forceinline__ Welford<A> chan_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const A r = count_ratio<A>(b.n, n);
  const A delta = b.mean - a.mean;
  Welford<A> out;
  out.mean = a.mean + delta * r;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<A>(a.n) * r;
  out.n = n;
  return out;
}

// --- Welford -----------------------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ Welford<A> shfl_xor(const Welford<A>& s, int mask) {
  Welford<A> o;
  o.mean = __shfl_xor_sync(kFullMask, s.mean, mask);
  o.m2 = __shfl_xor_sync(kFullMask, s.m2, mask);
  o.n = static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(s.n), mask));
  return o;
}

// Butterfly of Chan merges over aligned segments of `width` lanes (a power of two <= warp). At
// each level the lower lane's operand goes first (Chan's merge is not commutative in floating
// point), so both partners compute the same merge and every lane ends with the same bits. Empty
// operands (tail lanes, n == 0) are skipped by chan_merge.
template <typename A>
__device__ __forceinline__ Welford<A> warp_welford(Welford<A> s, int width) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  for (int off = 1; off < width; off <<= 1) {
    const Welford<A> o = shfl_xor(s, off);
    const bool upper = (lane & off) != 0;
    // Field-wise selects: selecting whole structs by reference would put them in local memory.
    const Welford<A> lo{upper ? o.mean : s.mean, upper ? o.m2 : s.m2, upper ? o.n : s.n};
    const Welford<A> hi{upper ? s.mean : o.mean, upper ? s.m2 : o.m2, upper ? s.n : o.n};
    s = chan_merge(lo, hi);
  }
  return s;
}

// Whole-block merge: warp butterflies, then warp 0 merges the per-warp results in lane order.
// smem: kMaxWarps + 1 slots. Two barriers; safe to call again right away (the result slot is
// rewritten only after every thread has passed the next call's first barrier).
template <typename A>
__device__ __forceinline__ Welford<A> block_welford(Welford<A> s, Welford<A>* smem) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int nwarps = static_cast<int>(blockDim.x) / kWarpSize;
  s = warp_welford(s, kWarpSize);
  if (nwarps == 1) {
    return s;
  }
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    Welford<A> v = lane < nwarps ? smem[lane] : Welford<A>{A(0), A(0), 0};
    v = warp_welford(v, kWarpSize);
    if (lane == 0) smem[kMaxWarps] = v;
  }
  __syncthreads();
  return smem[kMaxWarps];
}

template <typename A>
__device__ __forceinline__ Welford<A> group_welford(Welford<A> s, const Group& g,
                                                    Welford<A>* smem) {
  return g.block ? block_welford(s, smem) : warp_welford(s, g.width);
}

// --- sums of S values at once --------------------------------------------------------------------

// IEEE addition is commutative, so partners of the butterfly compute the same sums.
template <typename A, int S>
__device__ __forceinline__ void warp_sum(A (&v)[S], int width) {
  for (int off = 1; off < width; off <<= 1) {
#pragma unroll
    for (int s = 0; s < S; ++s) v[s] += __shfl_xor_sync(kFullMask, v[s], off);
  }
}

// smem: [kMaxWarps + 1][S]. Same barrier discipline as block_welford.
template <typename A, int S>
__device__ __forceinline__ void block_sum(A (&v)[S], A (*smem)[S]) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int nwarps = static_cast<int>(blockDim.x) / kWarpSize;
  warp_sum<A, S>(v, kWarpSize);
  if (nwarps == 1) {
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) smem[warp][s] = v[s];
  }
  __syncthreads();
  if (warp == 0) {
    A w[S];
#pragma unroll
    for (int s = 0; s < S; ++s) w[s] = lane < nwarps ? smem[lane][s] : A(0);
    warp_sum<A, S>(w, kWarpSize);
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s < S; ++s) smem[kMaxWarps][s] = w[s];
    }
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < S; ++s) v[s] = smem[kMaxWarps][s];
}

template <typename A, int S>
__device__ __forceinline__ void group_sum(A (&v)[S], const Group& g, A (*smem)[S]) {
  if (g.block) {
    block_sum<A, S>(v, smem);
  } else {
    warp_sum<A, S>(v, g.width);
  }
}

}  // namespace layernorm_ext::cuda
