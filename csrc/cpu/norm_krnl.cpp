// CPU row kernels for LayerNorm and RMSNorm, forward and backward.
//
// This file is compiled once per instruction set (see setup.py / CMakeLists.txt), each time with
// -DLNEXT_CPU_CAPABILITY=<isa> and that ISA's flags; it includes no torch header (kernel_api.h
// says why). The torch-facing glue in norm_cpu.cpp picks one table at run time (isa.cpp) and
// calls it over row ranges from at::parallel_for.
//
// Numerics (see ../shared/design/kernels.md and README "Numerics"):
//  * statistics in the accumulation type A (fp32, or fp64 for fp64 input);
//  * LayerNorm moments by Welford in L SIMD lanes over chunks of kChunk vectors, chunk results
//    merged by a binary-counter cascade of Chan merges (error ~log N, not ~N), lanes merged in a
//    fixed pairwise tree, the scalar tail (N mod L) merged last; short rows by the exact
//    two-pass algorithm; fp16 / bf16 rows by a one-pass variance wherever it cannot cancel, the
//    exact algorithms elsewhere: with AVX-512 from unshifted sums (sum_moments_*; bf16 rows with
//    AVX512-BF16 from vdpbf16ps dot products, dot_moments_*), on AVX2 / scalar for long rows
//    from shifted sums (moments_long_fwd);
//  * RMSNorm's sum of squares uses the same chunk / cascade / lane-tree blocking;
//  * y = ((x - mean) * rstd) * w + b: never folded into x * scale + shift, so a constant row and
//    N == 1 give exactly b;
//  * a row's result depends only on that row, N, the dtypes and the ISA: never on the number of
//    rows, the row's position or the thread count.
// Compiled with -ffp-contract=off: every fused multiply-add below is explicit (madd).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "../welford.h"
#include "kernel_api.h"
#include "vec.h"

#ifndef LNEXT_CPU_CAPABILITY
#error "norm_krnl.cpp must be compiled with -DLNEXT_CPU_CAPABILITY=<scalar|avx2|avx512>"
#endif

namespace layernorm_ext::cpu {
inline namespace LNEXT_CPU_CAPABILITY {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Vectors per Welford chunk (per lane: kChunk values, split over kStreams interleaved streams so
// the dependent Welford updates of one stream overlap with the others').
constexpr int kChunk = 32;
constexpr int kStreams = 4;
// Cascade levels: level i holds kChunk * 2^i vectors per lane; 48 covers any int64 row length.
constexpr int kLevels = 48;
// Forward: rows of at most this many vectors take the exact two-pass statistics (the row stays in
// L1), four rows interleaved. Measured against Welford at N = 768 fp32: LN 13% faster, RMS 21%.
constexpr int kShortRowVectors = 64;
// Backward: rows of at most this many vectors go four at a time (bwd_short_rows). Four rows of
// x and dy beyond L1 lose more than the shared loads gain (N = 1024 fp32: 10% slower).
constexpr int kShortBwdRowVectors = 32;

template <typename A>
struct Reciprocals {
  A r[kChunk];
  constexpr Reciprocals() : r() {
    for (int i = 0; i < kChunk; ++i) r[i] = A(1) / A(i + 1);
  }
};
template <typename A>
constexpr Reciprocals<A> kRecip{};

// Chan merge of (mb, qb, nb) into (ma, qa, na), for a scalar or a vector of lanes that all hold
// the same count. Either side may be empty; equal counts (the common case) need no division.
template <typename A, typename X>
inline void chan_merge(X& ma, X& qa, int64_t& na, const X& mb, const X& qb, int64_t nb) {
  if (nb == 0) {
    return;
  }
  if (na == 0) {
    ma = mb;
    qa = qb;
    na = nb;
    return;
  }
  const int64_t n = na + nb;
  const A ratio = na == nb ? A(0.5) : static_cast<A>(nb) / static_cast<A>(n);
  const A weight = static_cast<A>(na) * ratio;
  if constexpr (std::is_same_v<X, A>) {
    const A delta = mb - ma;
    ma = madd(delta, ratio, ma);
    qa = madd(delta * delta, weight, qa + qb);
  } else {
    const X delta = mb - ma;
    ma = madd(delta, X::set1(ratio), ma);
    qa = madd(delta * delta, X::set1(weight), qa + qb);
  }
  na = n;
}

// --- Statistics ------------------------------------------------------------------------------
//
// Every LayerNorm statistic is computed on x - x0, x0 being the row's first element. The shift
// costs one subtraction and removes the row's offset before anything is summed, so the error of
// the mean and variance no longer grows with the condition number kappa = (|mean| + std) / std
// (a row like 1e6 + randn keeps full fp32 accuracy). The apply pass uses the same shifted form.

// Moments of a row: mean of (x - shift), and the population variance.
template <typename A>
struct RowMoments {
  A shift;
  A mean;  // of x - shift
  A var;
};

// The second pass of the two-pass algorithm for R rows: each row's sum of squared deviations
// from its mean. load(k, v) gives whole vector v of row k as x - shift, load_tail(k) its partial
// last vector (lanes >= N mod L are masked off here). Two accumulators per row (even / odd
// vectors), the tail in the odd one; rows interleaved, each with the one-row instructions.
template <int R, typename V, typename A, typename Load, typename LoadTail>
inline void squared_deviations(int64_t N, const A* mean, Load load, LoadTail load_tail, A* m2) {
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  V vcenter[R];
  V s0[R];
  V s1[R];
  for (int k = 0; k < R; ++k) {
    vcenter[k] = V::set1(mean[k]);
    s0[k] = V::zero();
    s1[k] = V::zero();
  }
  int64_t v = 0;
  for (; v + 2 <= nfull; v += 2) {
    for (int k = 0; k < R; ++k) {
      const V d0 = load(k, v) - vcenter[k];
      const V d1 = load(k, v + 1) - vcenter[k];
      s0[k] = madd(d0, d0, s0[k]);
      s1[k] = madd(d1, d1, s1[k]);
    }
  }
  if (v < nfull) {
    for (int k = 0; k < R; ++k) {
      const V d = load(k, v) - vcenter[k];
      s0[k] = madd(d, d, s0[k]);
    }
  }
  if (tail > 0) {
    for (int k = 0; k < R; ++k) {
      const V d = (load_tail(k) - vcenter[k]).first(tail);
      s1[k] = madd(d, d, s1[k]);
    }
  }
  for (int k = 0; k < R; ++k) m2[k] = (s0[k] + s1[k]).sum();
}

// Short rows: the exact two-pass algorithm (sum, then sum of squared deviations), the row being
// re-read from registers / L1. A masked partial vector covers the tail, so there is no scalar
// loop and the tail is computed exactly like the body.
//
// R rows at once, each with exactly the instructions of the one-row version (R = 1): a short
// row's cost is mostly the latency of its dependent chain (sum -> horizontal sum -> mean ->
// squares -> horizontal sum), which R independent chains hide. The result of a row never
// depends on R, i.e. on which rows share a task.
//
// (16-bit LayerNorm rows with AVX-512 take the unshifted sums instead, sum_moments_short /
// dot_moments_short. An earlier version saved x - shift widened to fp32 in an L1 copy for the
// later passes: see fwd_rows_impl.)
// The test every one-pass variance M2 = sum(d^2) - sum(d) * mean(d) must pass to be kept: its
// relative error is about eps (1 + 2 mean(d)^2 / var), so with mean(d)^2 <= 4 var it stays
// within ~9 eps, far below the half ulp of a 16-bit output (2^-9 bf16, 2^-12 fp16). Other rows
// (and non-finite sums, which fail it) take an exact algorithm. Only the row's own values
// decide which, so a result still depends on nothing but the row.
template <typename A>
inline bool one_pass_kept(A m2, A cross) {
  return m2 >= A(0) && cross <= A(4) * m2;
}

template <int R, typename T, typename A = acc_t<T>>
inline void moments_short(const T* const* xs, int64_t N, RowMoments<A>* out) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  // Two accumulators per row (even / odd vectors), indexed statically so that they live in
  // registers: with R rows that is 2R independent chains.
  V vshift[R];
  V s0[R];
  V s1[R];
  for (int k = 0; k < R; ++k) {
    out[k].shift = load_acc(xs[k]);
    vshift[k] = V::set1(out[k].shift);
    s0[k] = V::zero();
    s1[k] = V::zero();
  }
  int64_t v = 0;
  for (; v + 2 <= nfull; v += 2) {
    for (int k = 0; k < R; ++k) {
      s0[k] = s0[k] + (V::load(xs[k] + v * L) - vshift[k]);
      s1[k] = s1[k] + (V::load(xs[k] + (v + 1) * L) - vshift[k]);
    }
  }
  if (v < nfull) {
    for (int k = 0; k < R; ++k) s0[k] = s0[k] + (V::load(xs[k] + v * L) - vshift[k]);
  }
  if (tail > 0) {
    for (int k = 0; k < R; ++k) {
      s1[k] = s1[k] + (V::load_partial(xs[k] + nfull * L, tail) - vshift[k]).first(tail);
    }
  }
  // Second pass, x - shift recomputed from x.
  A mean[R];
  A m2[R];
  for (int k = 0; k < R; ++k) {
    out[k].mean = (s0[k] + s1[k]).sum() / static_cast<A>(N);
    mean[k] = out[k].mean;
  }
  squared_deviations<R, V>(
      N, mean, [&](int k, int64_t v) { return V::load(xs[k] + v * L) - vshift[k]; },
      [&](int k) { return V::load_partial(xs[k] + nfull * L, tail) - vshift[k]; }, m2);
  for (int k = 0; k < R; ++k) out[k].var = welford_variance(m2[k], N);
}

// Welford over `count` consecutive vectors, as kStreams interleaved streams (stream u takes
// vectors u, u + kStreams, ...) merged pairwise. Returns per-lane (mean, m2) and the per-lane
// count. Scalar math per stream: d = x - m; m += d / (k + 1); m2 += d * (x - m_new).
template <typename T, typename V, typename A = acc_t<T>>
inline int64_t welford_vectors(const T* x, const V& vshift, int count, V& m_out, V& q_out) {
  constexpr int L = V::kSize;
  V m[kStreams];
  V q[kStreams];
  for (int u = 0; u < kStreams; ++u) {
    m[u] = V::zero();
    q[u] = V::zero();
  }
  const int steps = count / kStreams;
  const int extra = count % kStreams;
  for (int k = 0; k < steps; ++k) {
    const V r = V::set1(kRecip<A>.r[k]);
    for (int u = 0; u < kStreams; ++u) {
      const V xv = V::load(x + static_cast<int64_t>(k * kStreams + u) * L) - vshift;
      const V d = xv - m[u];
      m[u] = madd(d, r, m[u]);
      q[u] = madd(d, xv - m[u], q[u]);
    }
  }
  int64_t n[kStreams];
  for (int u = 0; u < kStreams; ++u) {
    n[u] = steps;
    if (u < extra) {
      const V xv = V::load(x + static_cast<int64_t>(steps * kStreams + u) * L) - vshift;
      const V d = xv - m[u];
      m[u] = madd(d, V::set1(kRecip<A>.r[steps]), m[u]);
      q[u] = madd(d, xv - m[u], q[u]);
      n[u] = steps + 1;
    }
  }
  chan_merge<A>(m[0], q[0], n[0], m[1], q[1], n[1]);
  chan_merge<A>(m[2], q[2], n[2], m[3], q[3], n[3]);
  chan_merge<A>(m[0], q[0], n[0], m[2], q[2], n[2]);
  m_out = m[0];
  q_out = q[0];
  return n[0];
}

// Long rows: Welford in L lanes. Chunks of kChunk vectors feed a binary counter: two results of
// equal count merge and carry upward, so every merge combines sets of similar size and the error
// grows like log N. Lanes then merge in a fixed pairwise tree; the scalar tail (N mod L) last.
template <typename T, typename A = acc_t<T>>
inline RowMoments<A> moments_long(const T* x, int64_t N) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nvec = N / L;
  const A shift = load_acc(x);
  const V vshift = V::set1(shift);

  V lvl_mean[kLevels];
  V lvl_m2[kLevels];
  uint64_t occupied = 0;
  int64_t v = 0;
  for (; v + kChunk <= nvec; v += kChunk) {
    V m, q;
    int64_t n = welford_vectors<T>(x + v * L, vshift, kChunk, m, q);
    int lvl = 0;
    while ((occupied >> lvl) & 1u) {
      chan_merge<A>(m, q, n, lvl_mean[lvl], lvl_m2[lvl], n);
      occupied &= ~(uint64_t{1} << lvl);
      ++lvl;
    }
    lvl_mean[lvl] = m;
    lvl_m2[lvl] = q;
    occupied |= uint64_t{1} << lvl;
  }
  // The partial chunk, then the occupied levels from the smallest up.
  V m = V::zero();
  V q = V::zero();
  int64_t n = 0;
  if (v < nvec) {
    n = welford_vectors<T>(x + v * L, vshift, static_cast<int>(nvec - v), m, q);
  }
  for (uint64_t bits = occupied; bits != 0; bits &= bits - 1) {
    const int lvl = __builtin_ctzll(bits);
    chan_merge<A>(m, q, n, lvl_mean[lvl], lvl_m2[lvl], int64_t{kChunk} << lvl);
  }
  // Lanes all hold n values, so their merge has a closed form (the pairwise Chan tree of equal
  // counts, unrolled): mean = average of the lane means, m2 = sum of lane m2 + n * sum of the
  // lanes' squared deviations from that mean. Horizontal sums are fixed pairwise trees.
  const A lane_mean = m.sum() / static_cast<A>(L);
  const V dev = m - V::set1(lane_mean);
  Welford<A> total{lane_mean, madd(static_cast<A>(n), (dev * dev).sum(), q.sum()), n * L};
  // Scalar tail: fewer than L elements, merged last.
  Welford<A> tail{A(0), A(0), 0};
  for (int64_t i = nvec * L; i < N; ++i) {
    const A xv = load_acc(x + i) - shift;
    const A d = xv - tail.mean;
    tail.mean = madd(d, kRecip<A>.r[tail.n], tail.mean);
    tail.m2 = madd(d, xv - tail.mean, tail.m2);
    ++tail.n;
  }
  chan_merge<A>(total.mean, total.m2, total.n, tail.mean, tail.m2, tail.n);
  return {shift, total.mean, welford_variance(total.m2, total.n)};
}

template <typename A>
constexpr bool is_short_row(int64_t N) {
  return N <= int64_t{kShortRowVectors} * Vec<A>::kSize;
}
template <typename A>
constexpr bool is_short_bwd_row(int64_t N) {
  return N <= int64_t{kShortBwdRowVectors} * Vec<A>::kSize;
}

// The 2L values at p as two vectors, in an order that only sums may use (each value once, lanes
// reduced at the end): bf16 in the even / odd layout (EvenOdd, vec.h) splits them by parity with
// one load and two integer operations where element order takes two widening loads and two
// shifts. LayerNorm's 16-bit sums (long_row_sums, sum_moments_short) load their vectors in such
// pairs: a row's sums then depend on the kernel set, as they already did, and still on nothing
// else. RMSNorm's sums of squares keep element order, which keeps 16-bit RMSNorm bitwise the
// fp32 computation on the upcast tensors (README, tested). Measured on LayerNorm bf16 (harness
// calling the kernel table, 1 thread, Xeon Skylake-SP, TSC cycles per 16 elements, min of 15,
// two interleaved runs), element order -> pairs: 2 x 2048 11.3-11.6 -> 10.6-10.8, 64 x 4096
// 10.6-11.6 -> 9.9, 2048 x 128 17.9-18.8 -> 17.2-17.3, 16384 x 1024 22.1-22.3 -> 21.2-21.4,
// 16384 x 4096 20.4-20.5 -> 20.2-20.4.
template <typename V, typename T>
LNEXT_ALWAYS_INLINE void load_pair(const T* p, V& a, V& b) {
  if constexpr (EvenOdd<V, T>::kOn) {
    EvenOdd<V, T>::load(p, a, b);
  } else {
    a = V::load(p);
    b = V::load(p + V::kSize);
  }
}

// Blocked pairwise summation of S parallel sums over a row: vector lanes accumulate over a chunk
// of kChunk vectors, chunk totals enter a binary-counter cascade, lanes reduce in a fixed tree.
template <typename V, int S>
struct CascadeSum {
  V level[kLevels][S];
  V chunk[S];
  uint64_t occupied = 0;
  int in_chunk = 0;

  CascadeSum() { reset_chunk(); }
  void reset_chunk() {
    for (int s = 0; s < S; ++s) chunk[s] = V::zero();
    in_chunk = 0;
  }
  // Call after adding one vector into chunk[].
  void step() {
    if (++in_chunk < kChunk) {
      return;
    }
    int lvl = 0;
    while ((occupied >> lvl) & 1u) {
      for (int s = 0; s < S; ++s) chunk[s] = level[lvl][s] + chunk[s];
      occupied &= ~(uint64_t{1} << lvl);
      ++lvl;
    }
    for (int s = 0; s < S; ++s) level[lvl][s] = chunk[s];
    occupied |= uint64_t{1} << lvl;
    reset_chunk();
  }
};

// Reduces the cascade and its partial chunk to S scalars: occupied levels from the smallest up,
// then the lanes by the vector's fixed pairwise horizontal sum.
template <typename V, int S, typename A>
inline void cascade_finish(const CascadeSum<V, S>& cs, A* out) {
  V acc[S];
  for (int s = 0; s < S; ++s) acc[s] = cs.chunk[s];
  for (uint64_t bits = cs.occupied; bits != 0; bits &= bits - 1) {
    const int lvl = __builtin_ctzll(bits);
    for (int s = 0; s < S; ++s) acc[s] = acc[s] + cs.level[lvl][s];
  }
  for (int s = 0; s < S; ++s) out[s] = acc[s].sum();
}

// sum(d) and sum(d^2) of a long row, d = x - shift (kShift) or x: four accumulators of each per
// chunk of kChunk vectors (independent add / FMA chains; two left the loop bound by their
// latency: bf16 2 x 2048 10.5-10.8 -> 10.2-10.4 TSC cycles per 16 elements, harness), the
// vectors loaded in pairs (load_pair), chunk totals into the cascade, the masked partial vector
// last.
template <bool kShift, typename T, typename A = acc_t<T>>
inline void long_row_sums(const T* x, int64_t N, A shift, A* sums) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  const V vshift = V::set1(shift);
  auto load = [&](int64_t v) {
    const V xv = V::load(x + v * L);
    if constexpr (kShift) {
      return xv - vshift;
    } else {
      return xv;
    }
  };
  CascadeSum<V, 2> cs;
  int64_t v = 0;
  while (v < nfull) {
    const int64_t chunk_end = std::min(nfull, v + kChunk);
    V s[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    V q[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    for (; v + 4 <= chunk_end; v += 4) {
      V d[4];
      load_pair(x + v * L, d[0], d[1]);
      load_pair(x + (v + 2) * L, d[2], d[3]);
      for (int u = 0; u < 4; ++u) {
        if constexpr (kShift) d[u] = d[u] - vshift;
        s[u] = s[u] + d[u];
        q[u] = madd(d[u], d[u], q[u]);
      }
    }
    for (int u = 0; v < chunk_end; ++v, ++u) {
      const V d = load(v);
      s[u] = s[u] + d;
      q[u] = madd(d, d, q[u]);
    }
    cs.chunk[0] = (s[0] + s[1]) + (s[2] + s[3]);
    cs.chunk[1] = (q[0] + q[1]) + (q[2] + q[3]);
    cs.in_chunk = kChunk - 1;
    cs.step();
  }
  if (tail > 0) {
    // Lanes >= tail load as zero; shifted, they are masked off again.
    V d = V::load_partial(x + nfull * L, tail);
    if constexpr (kShift) d = (d - vshift).first(tail);
    cs.chunk[0] = cs.chunk[0] + d;
    cs.chunk[1] = madd(d, d, cs.chunk[1]);
  }
  cascade_finish(cs, sums);
}

// Long 16-bit rows: sum(d) and sum(d^2) of d = x - x0 in one pass (blocked like RMSNorm's sum
// of squares), M2 = sum(d^2) - sum(d) * mean(d). Welford's update takes five dependent vector
// operations per vector where this takes two, and the statistics pass is half the row's
// arithmetic. The cancellation test is one_pass_kept: with mean(d)^2 <= 4 var the relative
// error stays within ~9 eps (times the blocked sum's log N), far below the half ulp of a 16-bit
// output; other rows (and non-finite sums) are recomputed by Welford, the row being in cache.
// fp32 / fp64 rows always take Welford: their outputs would see the difference.
template <typename T, typename A = acc_t<T>>
inline RowMoments<A> moments_long_fwd(const T* x, int64_t N) {
  if constexpr (std::is_same_v<T, A>) {
    return moments_long<T>(x, N);
  } else {
    const A shift = load_acc(x);
    A sums[2];
    long_row_sums<true>(x, N, shift, sums);
    const A mean = sums[0] / static_cast<A>(N);
    const A cross = sums[0] * mean;
    const A m2 = sums[1] - cross;
    if (one_pass_kept(m2, cross)) {
      return {shift, mean, welford_variance(m2, N)};
    }
    return moments_long<T>(x, N);
  }
}

// Mean of squares of one row (RMSNorm). Nothing cancels in a sum of squares, so blocked pairwise
// sums suffice: four accumulators per chunk of kChunk vectors (independent FMA chains), chunk
// totals into the cascade, a masked partial vector for the tail.
template <typename T, typename A = acc_t<T>>
inline A row_mean_square(const T* x, int64_t N) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  CascadeSum<V, 1> cs;
  int64_t v = 0;
  while (v < nfull) {
    const int64_t chunk_end = std::min(nfull, v + kChunk);
    V a[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    for (; v + 4 <= chunk_end; v += 4) {
      for (int u = 0; u < 4; ++u) {
        const V xv = V::load(x + (v + u) * L);
        a[u] = madd(xv, xv, a[u]);
      }
    }
    for (int u = 0; v < chunk_end; ++v, ++u) {
      const V xv = V::load(x + v * L);
      a[u] = madd(xv, xv, a[u]);
    }
    cs.chunk[0] = (a[0] + a[1]) + (a[2] + a[3]);
    cs.in_chunk = kChunk - 1;
    cs.step();
  }
  if (tail > 0) {
    const V xv = V::load_partial(x + nfull * L, tail);
    cs.chunk[0] = madd(xv, xv, cs.chunk[0]);
  }
  A sum;
  cascade_finish(cs, &sum);
  return sum / static_cast<A>(N);
}

// Mean of squares of R short rows at once (RMSNorm), each with the instructions of the one-row
// version: two accumulators per row (even / odd vectors), the tail in the odd one.
template <int R, typename T, typename A = acc_t<T>>
inline void mean_square_short(const T* const* xs, int64_t N, A* out) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  V s0[R];
  V s1[R];
  for (int k = 0; k < R; ++k) {
    s0[k] = V::zero();
    s1[k] = V::zero();
  }
  int64_t v = 0;
  for (; v + 2 <= nfull; v += 2) {
    for (int k = 0; k < R; ++k) {
      const V a = V::load(xs[k] + v * L);
      const V b = V::load(xs[k] + (v + 1) * L);
      s0[k] = madd(a, a, s0[k]);
      s1[k] = madd(b, b, s1[k]);
    }
  }
  if (v < nfull) {
    for (int k = 0; k < R; ++k) {
      const V a = V::load(xs[k] + v * L);
      s0[k] = madd(a, a, s0[k]);
    }
  }
  if (tail > 0) {
    for (int k = 0; k < R; ++k) {
      const V b = V::load_partial(xs[k] + nfull * L, tail);
      s1[k] = madd(b, b, s1[k]);
    }
  }
  for (int k = 0; k < R; ++k) out[k] = (s0[k] + s1[k]).sum() / static_cast<A>(N);
}

// --- Forward ---------------------------------------------------------------------------------

enum class WMode { kNone, kPlain, kPlusOne };

template <WMode kW, typename V>
inline V effective_weight(V w) {
  if constexpr (kW == WMode::kPlusOne) {
    return w + V::set1(1);
  } else {
    return w;
  }
}

// y = xhat * w + b, with xhat = ((x - shift) - mean) * rstd for LayerNorm (the shifted form of
// the statistics) and xhat = x * rstd for RMSNorm; wv and bv are the parameter values as stored
// (effective_weight applies 1 + w here), ignored where absent.
// kNoShift: the row's shift is 0 (the unshifted 16-bit statistics), so the subtraction is left
// out; x - 0 is x, so the results are the same.
template <NormKind K, WMode kW, bool kB, bool kNoShift, typename V>
LNEXT_ALWAYS_INLINE V apply_vals(const V& xv, const V& wv, const V& bv, const V& vshift,
                                 const V& vmean, const V& vrstd) {
  V xhat;
  if constexpr (K == NormKind::kLayerNorm) {
    if constexpr (kNoShift) {
      xhat = (xv - vmean) * vrstd;
    } else {
      xhat = ((xv - vshift) - vmean) * vrstd;
    }
  } else {
    xhat = xv * vrstd;
  }
  if constexpr (kW != WMode::kNone) {
    const V we = effective_weight<kW>(wv);
    if constexpr (kB) {
      return madd(xhat, we, bv);
    } else {
      return xhat * we;
    }
  } else if constexpr (kB) {
    return xhat + bv;
  } else {
    return xhat;
  }
}

// apply_vals with the parameters of elements [i, i + L) in element order; n >= 0 reads only the
// first n (the row's masked tail, computed exactly like the body).
template <NormKind K, WMode kW, bool kB, bool kNoShift, typename V, typename T, typename P>
LNEXT_ALWAYS_INLINE V apply_vec(const V& xv, const P* w, const P* b, int64_t i, int n,
                                const V& vshift, const V& vmean, const V& vrstd) {
  V wv = V::zero();
  V bv = V::zero();
  if constexpr (kW != WMode::kNone) wv = n < 0 ? V::load(w + i) : V::load_partial(w + i, n);
  if constexpr (kB) bv = n < 0 ? V::load(b + i) : V::load_partial(b + i, n);
  return apply_vals<K, kW, kB, kNoShift>(xv, wv, bv, vshift, vmean, vrstd);
}

// bf16 on AVX-512 is stored two vectors at a time (kPairStores, vec.h).
// kEvenOdd (bf16 without AVX512-BF16, EvenOdd in vec.h): fp32 w and b are in the layout of
// deinterleave_2l (bf16 ones are read as stored and split like the row), and the row is read and
// written 32 elements at a time in the even / odd layout; every element is computed by the same
// operations, so the results are bitwise the same.
// kFinite: no result of the row can be a NaN (fwd_rows_impl, kSkipNaNTest), so the even / odd
// stores leave out their NaN test; the bits are the same.
template <NormKind K, WMode kW, bool kB, bool kStream = false, bool kNoShift = false,
          bool kEvenOdd = false, bool kFinite = false, typename T, typename P,
          typename A = acc_t<T>>
inline void apply_row(const T* x, const P* w, const P* b, T* y, int64_t N, A shift, A mean, A rstd,
                      const T* prefetch_a = nullptr, const T* prefetch_b = nullptr) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const V vshift = V::set1(shift);
  const V vmean = V::set1(mean);
  const V vrstd = V::set1(rstd);
  int64_t i = 0;
  // Two copies of the loop, so that the common one carries no prefetch test (two compares and
  // branches per vector measured +16% on the 8-lane AVX2 path).
  // The next rows' line at element i, when asked.
  auto prefetch_at = [&](int64_t i, auto prefetch) {
    if constexpr (decltype(prefetch)::value) {
      prefetch_l2(prefetch_a + i);
      if (prefetch_b != nullptr) prefetch_l2(prefetch_b + i);
    }
  };
  // One vector at element i, after prefetching the next rows' line there when asked.
  auto vec_at = [&](int64_t i, auto prefetch) {
    prefetch_at(i, prefetch);
    return apply_vec<K, kW, kB, kNoShift, V, T>(V::load(x + i), w, b, i, -1, vshift, vmean, vrstd);
  };
  auto store_one = [&](const V& out, int64_t i) {
    if constexpr (kStream) {
      store_stream(out, y + i);
    } else {
      out.store(y + i);
    }
  };
  auto body = [&](auto prefetch) {
    // Two vectors of 16-bit x share a 64-byte line: one prefetch per line, and bf16 on AVX-512
    // rounds (or converts) and stores both at once (kPairStores).
    if constexpr (kEvenOdd && EvenOdd<V, T>::kOn) {
      for (; i + 2 * L <= N; i += 2 * L) {
        prefetch_at(i, prefetch);
        V even;
        V odd;
        EvenOdd<V, T>::load(x + i, even, odd);
        V ye;
        V yo;
        if constexpr (std::is_same_v<P, A>) {
          // fp32 parameters, already in the even / odd layout.
          ye = apply_vec<K, kW, kB, kNoShift, V, T>(even, w, b, i, -1, vshift, vmean, vrstd);
          yo = apply_vec<K, kW, kB, kNoShift, V, T>(odd, w, b, i + L, -1, vshift, vmean, vrstd);
        } else {
          // bf16 parameters as given, split like the row (the same values as widened ones).
          V we = V::zero(), wo = V::zero(), be = V::zero(), bo = V::zero();
          if constexpr (kW != WMode::kNone) EvenOdd<V, P>::load(w + i, we, wo);
          if constexpr (kB) EvenOdd<V, P>::load(b + i, be, bo);
          ye = apply_vals<K, kW, kB, kNoShift>(even, we, be, vshift, vmean, vrstd);
          yo = apply_vals<K, kW, kB, kNoShift>(odd, wo, bo, vshift, vmean, vrstd);
        }
        EvenOdd<V, T>::template store<kStream, !kFinite>(ye, yo, y + i);
      }
    } else if constexpr (sizeof(T) * L == 32) {
      for (; i + 2 * L <= N; i += 2 * L) {
        const V lo = vec_at(i, prefetch);
        const V hi = vec_at(i + L, std::false_type{});
        if constexpr (kPairStores<V, T>) {
          store_pair<kStream>(lo, hi, y + i);
        } else {
          store_one(lo, i);
          store_one(hi, i + L);
        }
      }
    }
    for (; i + L <= N; i += L) store_one(vec_at(i, prefetch), i);
  };
  if (prefetch_a != nullptr) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
  const int tail = static_cast<int>(N - i);
  if (tail > 0) {
    apply_vec<K, kW, kB, kNoShift, V, T>(V::load_partial(x + i, tail), w, b, i, tail, vshift, vmean,
                                         vrstd)
        .store_partial(y + i, tail);
  }
}

// s = a + b elementwise in the accumulation type, rounded once to T (as torch's add).
template <typename T, typename A = acc_t<T>>
inline void add_row(const T* a, const T* b, T* s, int64_t N) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  int64_t i = 0;
  if constexpr (kPairStores<V, T>) {
    for (; i + 2 * L <= N; i += 2 * L) {
      store_pair<false>(V::load(a + i) + V::load(b + i), V::load(a + i + L) + V::load(b + i + L),
                        s + i);
    }
  }
  for (; i + L <= N; i += L) (V::load(a + i) + V::load(b + i)).store(s + i);
  if (i < N) {
    const int n = static_cast<int>(N - i);
    (V::load_partial(a + i, n) + V::load_partial(b + i, n)).store_partial(s + i, n);
  }
}

// --- Overflow rescue -------------------------------------------------------------------------
//
// A finite row can have statistics beyond the accumulation type's range: fp32 [1e30, 2e30] has
// variance 2.5e59, and a row spanning +-3e38 overflows even x - x0. The vector paths then give
// var = inf or NaN, i.e. rstd = 0 and a silently wrong y (just the bias). Such rows (rare: the
// check costs one comparison per row) are recomputed here in double on the row scaled by 2^-e,
// e = the exponent of max|x|: the scaling is exact, no sum can overflow, and y comes out
// correct. The saved rstd = 2^-e / sqrt(var_s + eps 2^-2e) is representable in fp32 (at worst
// subnormal). Rows holding Inf or NaN are left to the normal path, which propagates them as
// PyTorch does. Returns false for those.
template <NormKind K, WMode kW, bool kB, typename T, typename P, typename A = acc_t<T>>
[[gnu::noinline, gnu::cold]] bool rescue_row(const T* x, const P* w, const P* b, T* y, int64_t N,
                                             A eps, A* mean_out, A* rstd_out) {
  double amax = 0;
  for (int64_t i = 0; i < N; ++i) {
    const double v = load_acc(x + i);
    if (!std::isfinite(v)) {
      return false;
    }
    amax = std::max(amax, std::fabs(v));
  }
  const int e = amax > 0 ? std::ilogb(amax) : 0;
  const double s = std::ldexp(1.0, -e);
  double mean_s = 0;
  if constexpr (K == NormKind::kLayerNorm) {
    for (int64_t i = 0; i < N; ++i) mean_s += static_cast<double>(load_acc(x + i)) * s;
    mean_s /= static_cast<double>(N);
  }
  double q = 0;
  for (int64_t i = 0; i < N; ++i) {
    const double d = static_cast<double>(load_acc(x + i)) * s - mean_s;
    q += d * d;
  }
  const double inv =
      1.0 / std::sqrt(q / static_cast<double>(N) + std::ldexp(static_cast<double>(eps), -2 * e));
  for (int64_t i = 0; i < N; ++i) {
    double v = (static_cast<double>(load_acc(x + i)) * s - mean_s) * inv;
    if constexpr (kW != WMode::kNone) {
      const A wi = load_acc(w + i);
      v *= static_cast<double>(kW == WMode::kPlusOne ? wi + A(1) : wi);
    }
    if constexpr (kB) {
      v += static_cast<double>(load_acc(b + i));
    }
    store_acc(y + i, static_cast<A>(v));
  }
  if (mean_out != nullptr) *mean_out = static_cast<A>(std::ldexp(mean_s, e));
  if (rstd_out != nullptr) *rstd_out = static_cast<A>(std::ldexp(inv, -e));
  return true;
}

// Row groups. The apply pass reads x, w and b and writes y; once a row and the parameters no
// longer fit in L1 together (N >= ~2K in fp32), each row would stream w and b from L2 again.
// Rows are then handled in groups: statistics row by row (x arrives from memory), then the
// apply pass tile by tile, each tile of w / b (L1-resident) serving every row of the group,
// whose x rows are still in L2. Only the loop order changes: every element is computed by the
// same instructions as in a whole-row apply (tiles are whole vectors), so results never depend
// on the grouping, i.e. on how rows are split across tasks.
// The x rows in L2 at once are at most kGroupBytes: one group, or, where the apply pass
// prefetches the next group's rows (FwdParams::prefetch_long_rows), this group and the next, of
// half that each. Measured (out=, 2 threads, Xeon Skylake-SP, 1 MiB L2, median of 5 rounds
// against copy_ of the same bytes, two runs each): with prefetch, 256 KiB groups (8 rows of
// 32 KiB) plus the next group ran LayerNorm fp32 2048 x 8192 at 0.69-0.73 of copy_'s bandwidth,
// 16384 x 8192 at 0.72-0.74 (RMSNorm 0.73-0.80, 0.79); 128 KiB groups 0.78-0.81, 0.81-0.82
// (RMSNorm 0.83-0.86, 0.87-0.91); 64 KiB groups the same as 128 KiB, and no change for rows of
// 16 KiB (bf16 2048 x 8192, fp32 2048 x 4096: groups of 4 instead of 8).
constexpr int64_t kL1Bytes = 24 * 1024;      // x row + parameter rows that stay in L1
constexpr int64_t kGroupBytes = 256 * 1024;  // x rows in L2 at once (see above)
constexpr int kMaxGroup = 8;
constexpr int64_t kApplyTile = 1024;  // elements; a multiple of every vector width

// Short rows: groups of kShortGroup rows share one interleaved statistics pass.
constexpr int kShortGroup = 4;

// --- 16-bit LayerNorm statistics from unshifted sums (AVX-512) --------------------------------
//
// sum(x) and sum(x^2) of the row as stored, with no shift, no widened copy and no second pass:
// the apply pass re-reads the row. fp16 rows widen each vector (vcvtph2ps, one instruction),
// bf16 rows without AVX512-BF16 too (zero-extend and shift); bf16 rows on AVX512-BF16 use dot
// products (below). Measured (harness, 1 thread, fp16 LayerNorm, AMD Zen 4, cycles per 16
// elements, widened copy -> sums): 512 x 768 9.5 -> 8.0, 512 x 4096 9.4 -> 8.1, 2048 x 128
// 14.5 -> 12.4.
//
// vdpbf16ps multiplies bf16 pairs into fp32 (exactly: an 8-bit by 8-bit significand product fits
// fp32's 24 bits) and adds both products of a lane pair to an fp32 accumulator. So sum(x) (against
// ones) and sum(x^2) take one instruction each per 32 elements of the row as stored, where the
// widened copy spent about five per 16 (widen, shift, add, square-add, save), and the apply
// pass then re-reads the row as stored. Measured (harness, 1 thread, bf16 LayerNorm, cycles per
// 16 elements, widened -> dot): 512 x 768 9.6-9.9 -> 8.0, 512 x 4096 10.4-10.7 -> 7.8-8.3,
// 2048 x 128 14.9 -> 13.1-13.5, 2048 x 50 31.5 -> 27.1-28.2.
//
// Numerics. The sums are not shifted by x0, so M2 = sum(x^2) - sum(x) * mean is the one-pass
// variance of moments_long_fwd, kept under the same cancellation test (mean^2 <= 4 var: relative
// error ~9 eps times the blocked sum's log N); rows with a large mean, the reason for the shift,
// fail it. vdpbf16ps reads subnormal inputs as zero and flushes subnormal results, which moves a
// sum by at most 2^-126 per element: invisible once the row's sum of squares is at least
// kOnePassMinSquares (std >= 2^-31 / sqrt(N) under the test). Rows outside the tests (a large
// mean, tiny values, non-finite sums) are recomputed by Welford, the row being in cache, and keep
// Welford's shift; rows that pass get shift 0, and the apply pass reads x itself.
// RMSNorm keeps the widened sum of squares: its 16-bit results are bitwise those of the fp32
// computation on the upcast tensors (test_f16_low_precision_is_fp32_rounded_once), which a
// pairwise dot-product order would break.
constexpr float kOnePassMinSquares = 0x1p-60f;

// Moments from sum(x) and sum(x^2), or Welford where a test above fails.
template <typename T>
inline RowMoments<float> one_pass_moments(const T* x, int64_t N, float sum, float squares) {
  const float mean = sum / static_cast<float>(N);
  const float cross = sum * mean;
  const float m2 = squares - cross;
  if (squares >= kOnePassMinSquares && std::isfinite(squares) && one_pass_kept(m2, cross))
      [[likely]] {
    return {0.0f, mean, welford_variance(m2, N)};
  }
  return moments_long<T>(x, N);
}

// fp16 rows, and bf16 rows without AVX512-BF16: the sums from widened vectors, blocked like
// moments_long_fwd (long rows) and moments_short (short rows, R at once with the one-row
// instructions).
template <typename T>
inline RowMoments<float> sum_moments_long(const T* x, int64_t N) {
  float sums[2];
  long_row_sums<false>(x, N, 0.0f, sums);
  return one_pass_moments(x, N, sums[0], sums[1]);
}

// The visiting order of the unshifted short-row sums: vectors in pairs, the even one into a
// row's accumulator 0 and the odd one into 1, rows interleaved within each pair, a leftover
// vector into 0. step(k, v, odd) adds vector v of row k.
template <int R, typename Step>
inline void visit_short_rows(int64_t nfull, Step step) {
  int64_t v = 0;
  for (; v + 2 <= nfull; v += 2) {
    for (int k = 0; k < R; ++k) {
      step(k, v, 0);
      step(k, v + 1, 1);
    }
  }
  if (v < nfull) {
    for (int k = 0; k < R; ++k) step(k, v, 0);
  }
}

template <int R, typename T>
inline void sum_moments_short(const T* const* xs, int64_t N, RowMoments<float>* out) {
  using V = Vec<float>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  V s0[R], s1[R], q0[R], q1[R];
  for (int k = 0; k < R; ++k) s0[k] = s1[k] = q0[k] = q1[k] = V::zero();
  // The order of visit_short_rows, the pairs loaded by load_pair.
  int64_t v = 0;
  for (; v + 2 <= nfull; v += 2) {
    for (int k = 0; k < R; ++k) {
      V a;
      V b;
      load_pair(xs[k] + v * L, a, b);
      s0[k] = s0[k] + a;
      q0[k] = madd(a, a, q0[k]);
      s1[k] = s1[k] + b;
      q1[k] = madd(b, b, q1[k]);
    }
  }
  if (v < nfull) {
    for (int k = 0; k < R; ++k) {
      const V a = V::load(xs[k] + v * L);
      s0[k] = s0[k] + a;
      q0[k] = madd(a, a, q0[k]);
    }
  }
  for (int k = 0; k < R; ++k) {
    V s = s0[k] + s1[k];
    V q = q0[k] + q1[k];
    if (tail > 0) {
      const V xv = V::load_partial(xs[k] + nfull * L, tail);
      s = s + xv;
      q = madd(xv, xv, q);
    }
    out[k] = one_pass_moments(xs[k], N, s.sum(), q.sum());
  }
}

#if defined(__AVX512BF16__)
constexpr bool kDotStats = true;
constexpr int kDotSize = 32;  // bf16 elements per 512-bit vector

inline __m512bh bf16_ones() { return (__m512bh)_mm512_set1_epi16(0x3F80); }

inline __m512bh load_bf16_tail(const BFloat16* p, int n) {
  // Masked-off elements load as +0 and add exact zeros.
  return (__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << n) - 1u), p);
}

// Long rows: four accumulators per sum over chunks of kChunk vectors, chunk totals into the
// cascade (as row_mean_square), the masked tail vector last.
template <typename T>
inline RowMoments<float> dot_moments_long(const T* x, int64_t N) {
  static_assert(std::is_same_v<T, BFloat16>);
  constexpr int L = kDotSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  const __m512bh ones = bf16_ones();
  CascadeSum<Vec<float>, 2> cs;
  int64_t v = 0;
  while (v < nfull) {
    const int64_t chunk_end = std::min(nfull, v + kChunk);
    __m512 s[4], q[4];
    for (int u = 0; u < 4; ++u) s[u] = q[u] = _mm512_setzero_ps();
    auto step = [&](int u) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + v * L);
      s[u] = _mm512_dpbf16_ps(s[u], xv, ones);
      q[u] = _mm512_dpbf16_ps(q[u], xv, xv);
    };
    while (v + 4 <= chunk_end) {
      for (int u = 0; u < 4; ++u, ++v) step(u);
    }
    for (int u = 0; v < chunk_end; ++v, ++u) step(u);
    cs.chunk[0] = {_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]))};
    cs.chunk[1] = {_mm512_add_ps(_mm512_add_ps(q[0], q[1]), _mm512_add_ps(q[2], q[3]))};
    cs.in_chunk = kChunk - 1;
    cs.step();
  }
  if (tail > 0) {
    const __m512bh xv = load_bf16_tail(x + nfull * L, tail);
    cs.chunk[0] = {_mm512_dpbf16_ps(cs.chunk[0].v, xv, ones)};
    cs.chunk[1] = {_mm512_dpbf16_ps(cs.chunk[1].v, xv, xv)};
  }
  float sums[2];
  cascade_finish(cs, sums);
  return one_pass_moments(x, N, sums[0], sums[1]);
}

// Short rows (at most kChunk vectors: no cascade), R at once, each row with the instructions of
// the one-row version (R = 1), so the grouping never changes a result: sum = tail + (s0 + s1),
// the masked tail vector in its own accumulator. Short rows need the R independent chains (bf16
// 2048 x 128: 24.5 cycles per 16 elements row by row, 13.1 four at a time).
template <int R, typename T>
inline void dot_moments_short(const T* const* xs, int64_t N, RowMoments<float>* out) {
  static_assert(std::is_same_v<T, BFloat16>);
  constexpr int L = kDotSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  const __m512bh ones = bf16_ones();
  __m512 s0[R], s1[R], q0[R], q1[R];
  for (int k = 0; k < R; ++k) s0[k] = s1[k] = q0[k] = q1[k] = _mm512_setzero_ps();
  auto step = [&](int k, int64_t v, __m512& s, __m512& q) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[k] + v * L);
    s = _mm512_dpbf16_ps(s, xv, ones);
    q = _mm512_dpbf16_ps(q, xv, xv);
  };
  visit_short_rows<R>(nfull, [&](int k, int64_t v, int odd) {
    step(k, v, odd ? s1[k] : s0[k], odd ? q1[k] : q0[k]);
  });
  for (int k = 0; k < R; ++k) {
    __m512 s = _mm512_add_ps(s0[k], s1[k]);
    __m512 q = _mm512_add_ps(q0[k], q1[k]);
    if (tail > 0) {
      const __m512bh xv = load_bf16_tail(xs[k] + nfull * L, tail);
      s = _mm512_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xv, ones), s);
      q = _mm512_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xv, xv), q);
    }
    out[k] = one_pass_moments(xs[k], N, _mm512_reduce_add_ps(s), _mm512_reduce_add_ps(q));
  }
}
#else
constexpr bool kDotStats = false;
// Named only in the discarded `if constexpr (kDot)` branches of fwd_rows_impl.
template <typename T>
RowMoments<float> dot_moments_long(const T*, int64_t) {
  static_assert(sizeof(T) == 0, "AVX512-BF16 only");
  return {};
}
template <int R, typename T>
void dot_moments_short(const T* const*, int64_t, RowMoments<float>*) {
  static_assert(sizeof(T) == 0, "AVX512-BF16 only");
}
#endif

// Whether the first n values of p (null: none) are all finite, from their bits: a value is
// finite iff its magnitude bits are below those of +inf, so one max over the masked bits decides
// (an and and a max per 32 bf16 values, no dependent floating-point chain: the earlier sum of
// v - v cost 27% of a two-row bf16 task of N = 2048, harness, 1 thread).
template <typename P>
bool all_finite(const P* p, int64_t n) {
  static_assert(std::is_same_v<P, BFloat16> || std::is_same_v<P, float>);
  if (p == nullptr) return true;
  using U = std::conditional_t<std::is_same_v<P, BFloat16>, uint16_t, uint32_t>;
  constexpr U kMagnitude = static_cast<U>(std::is_same_v<P, BFloat16> ? 0x7FFFu : 0x7FFFFFFFu);
  constexpr U kInf = static_cast<U>(std::is_same_v<P, BFloat16> ? 0x7F80u : 0x7F800000u);
  U m = 0;
  for (int64_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof(U));
    m = std::max<U>(m, u & kMagnitude);
  }
  return m < kInf;
}

template <NormKind K, WMode kW, bool kB, typename T, typename P>
int row_group_size(int64_t N, bool prefetch_next_group) {
  if (is_short_row<acc_t<T>>(N)) {
    return kShortGroup;
  }
  constexpr int64_t param_bytes =
      (kW != WMode::kNone ? int64_t{sizeof(P)} : 0) + (kB ? int64_t{sizeof(P)} : 0);
  const int64_t row_bytes = N * int64_t{sizeof(T)};
  if (param_bytes == 0 || N * param_bytes + row_bytes <= kL1Bytes) {
    return 1;
  }
  const int64_t budget = prefetch_next_group ? kGroupBytes / 2 : kGroupBytes;
  return static_cast<int>(std::clamp<int64_t>(budget / row_bytes, 1, kMaxGroup));
}

// w, b: the parameters as given (kW, P), for the overflow rescue; wa, ba: what the apply pass
// reads (kWA, PA): w and b themselves, or fp32 copies with 1 + w folded in and, where kEvenOdd,
// in the even / odd layout (fwd_rows).
template <NormKind K, WMode kW, bool kB, bool kStream, bool kEvenOdd, typename T, typename P,
          WMode kWA, typename PA>
void fwd_rows_impl(const FwdParams& p, const P* w, const P* b, const PA* wa, const PA* ba,
                   int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t N = p.N;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);
  const A eps = static_cast<A>(p.eps);
  const T* res = static_cast<const T*>(p.residual);
  T* res_out = static_cast<T*>(p.residual_out);
  // RMSNorm's short rows of at least 1 KiB from beyond L2 (p.prefetch_x) go one by one: there
  // the four interleaved rows' streams measured slower (harness, 1 thread, cycles per 16
  // elements: fp32 16384 x 1024 22.1 -> 16.3-17.5, 32768 x 512 22.5 -> 17.1; bf16 16384 x 1024
  // 14.3-15.7 -> 10.8-11.9, fp16 16384 x 768 12.4-12.7 -> 9.9-10.7). Shorter rows need the
  // interleave to hide each row's dependent chain (bf16 65536 x 256: 12.7 -> 15.6 one by one).
  // LayerNorm's two statistics passes gain more from the interleave than they lose (bf16
  // 16384 x 1024: 14.6 four at a time, 17.8 one by one).
  const int group = K == NormKind::kRMSNorm && p.prefetch_x && is_short_row<A>(N) &&
                            N * int64_t{sizeof(T)} >= 1024
                        ? 1
                        : row_group_size<K, kWA, kB, T, PA>(N, p.prefetch_long_rows);

  struct RowState {
    const T* x;
    T* y;
    A shift, mean, rstd;
    bool done;  // already written by the overflow rescue
  };
  const bool short_rows = is_short_row<A>(N);
  RowState rows[kMaxGroup];
  // 16-bit LayerNorm with AVX-512 takes its statistics from unshifted sums of the row as stored:
  // bf16 with AVX512-BF16 by dot products (dot_moments_*), fp16 and (without it) bf16 by sums of
  // widened vectors (sum_moments_*); the apply pass re-reads the row. (AVX2 keeps its exact
  // two-pass short rows and shifted one-pass long rows: the sums were not measured there.) The
  // sums replaced a widened L1 copy of x - shift that the statistics pass wrote and the apply
  // pass read: measured (harness, 1 thread, bf16 LayerNorm without AVX512-BF16, Xeon
  // Skylake-SP, cycles per 16 elements, copy -> sums): 512 x 768 13.6 -> 13.4, 512 x 4096
  // 17.1 -> 16.0, 2048 x 128 19.9 -> 20.0, 2048 x 50 42.9 -> 41.9 (fp16 and bf16 with
  // AVX512-BF16: see sum_moments_long).
  constexpr bool kDot = kDotStats && K == NormKind::kLayerNorm && std::is_same_v<T, BFloat16>;
  constexpr bool kSums =
      K == NormKind::kLayerNorm && !kDot && !std::is_same_v<T, A> && Vec<A>::kSize >= 16;
  constexpr bool kUnshifted = kDot || kSums;
  // bf16 rows in the even / odd layout store without the NaN test (apply_row's kFinite) where no
  // result of the row can be a NaN. A finite mean and rstd mean a finite row (an infinity or NaN
  // in x makes the sums, hence var or mean, non-finite) whose xhat = ((x - shift) - mean) * rstd
  // is finite: the squares that bound |x - mean| would have overflowed var first (RMSNorm alike:
  // |x * rstd| is bounded through the mean of squares; rstd = inf, an all-zero row with eps = 0,
  // fails the test). With finite parameters (1 + w of a finite w is finite), xhat * w + b and
  // its parts are then finite or, on overflow, an infinity, but never a NaN (that takes
  // inf - inf or 0 * inf). So the stored bits are those of the NaN-testing store. The parameter
  // test runs once per task of at least kFiniteTestRows rows, over the values the apply pass
  // reads; rows that fail either test, and smaller tasks, keep the NaN test. Measured (harness
  // calling the kernel table, 1 thread, Xeon Skylake-SP, 64-byte-aligned buffers, TSC cycles per
  // 16 elements, min of 15, interleaved runs), NaN test kept -> left out: LayerNorm bf16
  // 64 x 4096 11.1-11.2 -> 10.6-11.0, 512 x 768 11.0-11.1 -> 11.0; RMSNorm bf16 512 x 4096
  // 11.0-11.3 -> 10.3-10.8; rows from DRAM (16384 x 4096) unchanged. The parameter test costs
  // more than it saves on one to three rows (LayerNorm bf16 1 x 768 13.7-14.0 -> 15.6-15.8
  // with it, 2 x 768 12.2-12.3 -> 13.5).
  constexpr bool kSkipNaNTest = kEvenOdd && EvenOdd<Vec<A>, T>::kOn;
  constexpr int64_t kFiniteTestRows = 4;
  bool params_finite = false;
  if constexpr (kSkipNaNTest) {
    params_finite = end - begin >= kFiniteTestRows &&
                    all_finite(kWA != WMode::kNone ? wa : nullptr, N) &&
                    all_finite(kB ? ba : nullptr, N);
  }
  // The apply pass over [j, j + len) of a row, in the row's variant.
  auto apply = [&](const RowState& st, int64_t j, int64_t len, const PA* wj, const PA* bj,
                   const T* pf_x, const T* pf_res) {
    auto run = [&](auto no_shift, auto finite) {
      apply_row<K, kWA, kB, kStream, decltype(no_shift)::value, kEvenOdd, decltype(finite)::value>(
          st.x + j, wj, bj, st.y + j, len, st.shift, st.mean, st.rstd, pf_x, pf_res);
    };
    auto with_shift = [&](auto no_shift) {
      if constexpr (kSkipNaNTest) {
        if (params_finite && std::isfinite(st.shift) && std::isfinite(st.mean) &&
            std::isfinite(st.rstd)) {
          return run(no_shift, std::true_type{});
        }
      }
      run(no_shift, std::false_type{});
    };
    if (kUnshifted && st.shift == A(0)) {
      with_shift(std::true_type{});
    } else {
      with_shift(std::false_type{});
    }
  };
  for (int64_t r0 = begin; r0 < end; r0 += group) {
    const int g = static_cast<int>(std::min<int64_t>(group, end - r0));
    const T* xs[kMaxGroup];
    for (int k = 0; k < g; ++k) {
      const int64_t r = r0 + k;
      RowState& st = rows[k];
      st.x = x + r * p.x_stride;
      st.y = y + r * p.y_stride;
      if (res != nullptr) {
        // Fused residual add: s = x + residual, rounded to the storage dtype and stored as
        // residual_out; the rounded s (re-read from cache) is what gets normalised, so the
        // result is bitwise the unfused norm(x + residual).
        T* sr = res_out + r * p.residual_out_stride;
        add_row(st.x, res + r * p.residual_stride, sr, N);
        st.x = sr;
      }
      xs[k] = st.x;
    }
    RowMoments<A> moments[kMaxGroup];
    A mean_squares[kMaxGroup];
    if (short_rows) {
      if constexpr (kDot) {
        if (g == kShortGroup) {
          dot_moments_short<kShortGroup, T>(xs, N, moments);
        } else {
          for (int k = 0; k < g; ++k) dot_moments_short<1, T>(xs + k, N, moments + k);
        }
      } else if constexpr (kSums) {
        if (g == kShortGroup) {
          sum_moments_short<kShortGroup, T>(xs, N, moments);
        } else {
          for (int k = 0; k < g; ++k) sum_moments_short<1, T>(xs + k, N, moments + k);
        }
      } else if constexpr (K == NormKind::kLayerNorm) {
        if (g == kShortGroup) {
          moments_short<kShortGroup, T>(xs, N, moments);
        } else {
          for (int k = 0; k < g; ++k) moments_short<1, T>(xs + k, N, moments + k);
        }
      } else {
        if (g == kShortGroup) {
          mean_square_short<kShortGroup, T>(xs, N, mean_squares);
        } else {
          for (int k = 0; k < g; ++k) mean_square_short<1, T>(xs + k, N, mean_squares + k);
        }
      }
    }
    for (int k = 0; k < g; ++k) {
      const int64_t r = r0 + k;
      RowState& st = rows[k];
      RowMoments<A> mo{A(0), A(0), A(0)};
      bool overflow;
      if constexpr (K == NormKind::kLayerNorm) {
        if (short_rows) {
          mo = moments[k];
        } else if constexpr (kDot) {
          mo = dot_moments_long(st.x, N);
        } else if constexpr (kSums) {
          mo = sum_moments_long(st.x, N);
        } else {
          mo = moments_long_fwd<T>(st.x, N);
        }
        st.rstd = A(1) / std::sqrt(mo.var + eps);
        overflow = !(std::isfinite(mo.var) && std::isfinite(mo.mean));
      } else {
        const A ms = short_rows ? mean_squares[k] : row_mean_square<T>(st.x, N);
        st.rstd = A(1) / std::sqrt(ms + eps);
        overflow = !std::isfinite(ms);
      }
      st.shift = mo.shift;
      st.mean = mo.mean;
      st.done = false;
      if (overflow) [[unlikely]] {
        st.done = rescue_row<K, kW, kB, T, P>(st.x, w, b, st.y, N, eps,
                                              mean_out != nullptr ? mean_out + r : nullptr,
                                              rstd_out != nullptr ? rstd_out + r : nullptr);
        if (st.done) continue;
      }
      if (mean_out != nullptr) mean_out[r] = mo.shift + mo.mean;
      if (rstd_out != nullptr) rstd_out[r] = st.rstd;
    }
    if (g == 1 && !short_rows) {
      const RowState& st = rows[0];
      // Long rows, one at a time: the next row is fetched into L2 during this row's apply pass
      // where p.prefetch_long_rows asks for it (see kernel_api.h).
      const bool pf = p.prefetch_long_rows && r0 + 1 < end;
      const T* pf_x = pf ? x + (r0 + 1) * p.x_stride : nullptr;
      const T* pf_res = pf && res != nullptr ? res + (r0 + 1) * p.residual_stride : nullptr;
      if (!st.done) apply(st, 0, N, wa, ba, pf_x, pf_res);
      continue;
    }
    for (int64_t j = 0; j < N; j += kApplyTile) {
      const int64_t len = std::min(kApplyTile, N - j);
      const PA* wj = kWA != WMode::kNone ? wa + j : nullptr;
      const PA* bj = kB ? ba + j : nullptr;
      for (int k = 0; k < g; ++k) {
        const RowState& st = rows[k];
        if (st.done) {
          continue;
        }
        // While row k is applied, row k of the next group is fetched into L2, so the next
        // statistics pass finds it there: short rows whenever p.prefetch_x, long rows where
        // p.prefetch_long_rows (see kernel_api.h).
        const int64_t next = r0 + g + k;
        const bool pf = (short_rows ? p.prefetch_x : p.prefetch_long_rows) && next < end;
        const T* pf_x = pf ? x + next * p.x_stride + j : nullptr;
        const T* pf_res = pf && res != nullptr ? res + next * p.residual_stride + j : nullptr;
        apply(st, j, len, wj, bj, pf_x, pf_res);
      }
    }
  }
  if constexpr (kStream) stream_fence();
}

// Non-temporal stores are a separate instantiation (the choice is per call, never per row).
template <NormKind K, WMode kW, bool kB, bool kEvenOdd, typename T, typename P, WMode kWA = kW,
          typename PA = P>
void fwd_rows_impl(const FwdParams& p, const P* w, const P* b, const PA* wa, const PA* ba,
                   int64_t begin, int64_t end) {
  if (p.stream_y) {
    fwd_rows_impl<K, kW, kB, true, kEvenOdd, T, P, kWA, PA>(p, w, b, wa, ba, begin, end);
  } else {
    fwd_rows_impl<K, kW, kB, false, kEvenOdd, T, P, kWA, PA>(p, w, b, wa, ba, begin, end);
  }
}

// The apply pass's parameter layout for EvenOdd (vec.h): in each whole block of 2L elements the
// L even-indexed values, then the L odd-indexed ones; the last N % 2L values as they are.
// Returns dst (nullptr for an absent src).
template <int L, typename A>
const A* deinterleave_2l(const A* src, A* dst, int64_t N) {
  if (src == nullptr) return nullptr;
  int64_t c = 0;
  for (; c + 2 * L <= N; c += 2 * L) {
    for (int j = 0; j < L; ++j) {
      dst[c + j] = src[c + 2 * j];
      dst[c + L + j] = src[c + 2 * j + 1];
    }
  }
  for (; c < N; ++c) dst[c] = src[c];
  return dst;
}

// fp16 / bf16 parameters widened to fp32 for the apply pass, with 1 + w folded in (in fp32,
// exactly as the per-element path computes it): in the even / odd layout of deinterleave_2l
// where kEvenOdd (each whole block of 2L elements loaded as EvenOdd loads a row, one load and
// two integer operations per 32 values), else in element order. An absent src stays absent.
template <WMode kW, bool kEvenOdd, typename P, typename A>
A* widen_params(const P* src, A* dst, int64_t N) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  if (src == nullptr) return nullptr;
  int64_t i = 0;
  if constexpr (kEvenOdd) {
    for (; i + 2 * L <= N; i += 2 * L) {
      V even;
      V odd;
      EvenOdd<V, P>::load(src + i, even, odd);
      effective_weight<kW>(even).store(dst + i);
      effective_weight<kW>(odd).store(dst + i + L);
    }
  }
  for (; i + L <= N; i += L) effective_weight<kW>(V::load(src + i)).store(dst + i);
  if (i < N) {
    const int n = static_cast<int>(N - i);
    effective_weight<kW>(V::load_partial(src + i, n)).store_partial(dst + i, n);
  }
  return dst;
}

// fp16 / bf16 parameters are widened to fp32 once per task of kWidenMinRows rows or more
// (widen_params), so every row then reads fp32 parameters without a conversion; smaller tasks and
// the overflow rescue read them as given. The arithmetic is identical either way: results do not
// depend on how rows are split.
template <NormKind K, WMode kW, bool kB, typename T, typename P>
void fwd_rows(const FwdParams& p, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int L = V::kSize;
  constexpr bool kHasParams = kW != WMode::kNone || kB;
  // bf16 rows without AVX512-BF16 apply in the even / odd layout (EvenOdd, vec.h), with fp32
  // parameters reordered to match once per task; a one-row task with fp32 parameters keeps the
  // element order (same bits, no reordering). Measured against the element-order pass (dev A/B of
  // two builds, 1 thread, out=, min of 7, Xeon Skylake-SP, 2026-11-28): LayerNorm 512 x 768 151.3
  // -> 131.3 us, 256 x 4096 371.8 -> 323.8, 2048 x 1024 642.4 -> 572.7; RMSNorm 256 x 4096 322.4 ->
  // 251.6 (bf16 weight and bias; fp32 parameters alike: 6-22 % less time over 16 shapes).
  // 16-bit parameters: a task of fewer than kWidenMinRows rows reads them as stored (bf16 ones
  // split like the row: one integer operation per parameter vector); larger tasks widen them
  // once, bf16 ones straight into the even / odd layout (widen_params). Widening every task of
  // two or more rows (and bf16 ones in element order, then reordering) took as long as the rows
  // themselves for a few rows, and one-row bf16 tasks applied in element order. Measured
  // (harness calling the kernel table, 1 thread, LayerNorm with 16-bit weight and bias, Xeon
  // Skylake-SP, TSC cycles per 16 elements, min of 15; before -> widened into the layout ->
  // read as stored): bf16 1 x 768 22.5 -> (as stored) 13.9; 1 x 4096 15.0 -> 11.6; 2 x 4096
  // 32.9 -> 16.9 -> 12.4; 4 x 768 16.2 -> 13.4 -> 11.2; 8 x 4096 21.5 -> 12.6 -> 11.6; 16 x 4096
  // 12.7 -> 11.6 -> 10.7; 256 x 768 11.2 -> 10.3 -> 11.0. fp16 (widened -> as stored): 2 x 4096
  // 18.6-19.0 -> 9.8-11.0, 4 x 4096 12.1 -> 9.0-10.0, 8 x 768 12.1-15.7 -> 8.9-14.0. The AVX2
  // kernels: fp16 2 x 4096 30.2-32.5 -> 21.6-25.6, otherwise within this VM's noise.
  constexpr bool kEO = EvenOdd<V, T>::kOn;
  constexpr int64_t kWidenMinRows = 16;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  const int64_t N = p.N;
  const bool many_rows = end - begin > 1;
  if constexpr (!std::is_same_v<P, A> && kHasParams) {
    if (end - begin >= kWidenMinRows) {
      const int64_t nw = kW != WMode::kNone ? N : 0;
      const int64_t nb = kB ? N : 0;
      std::unique_ptr<A[]> scratch(new A[nw + nb]);
      constexpr WMode kWf = kW == WMode::kNone ? WMode::kNone : WMode::kPlain;
      const A* wf = widen_params<kW, kEO>(kW != WMode::kNone ? w : nullptr, scratch.get(), N);
      const A* bf = widen_params<WMode::kPlain, kEO>(kB ? b : nullptr, scratch.get() + nw, N);
      return fwd_rows_impl<K, kW, kB, kEO, T, P, kWf, A>(p, w, b, wf, bf, begin, end);
    }
  }
  if constexpr (kEO && (!kHasParams || !std::is_same_v<P, A>)) {
    // No parameters, or bf16 ones read as stored by a task of few rows.
    return fwd_rows_impl<K, kW, kB, true, T, P>(p, w, b, w, b, begin, end);
  } else if constexpr (kEO && std::is_same_v<P, A>) {
    // fp32 parameters with bf16 rows.
    if (many_rows) {
      const int64_t nw = kW != WMode::kNone ? N : 0;
      const int64_t nb = kB ? N : 0;
      std::unique_ptr<A[]> scratch(new A[nw + nb]);
      return fwd_rows_impl<K, kW, kB, true, T, P>(p, w, b, deinterleave_2l<L>(w, scratch.get(), N),
                                                  deinterleave_2l<L>(b, scratch.get() + nw, N),
                                                  begin, end);
    }
  }
  fwd_rows_impl<K, kW, kB, false, T, P>(p, w, b, w, b, begin, end);
}

// --- Backward --------------------------------------------------------------------------------
//
// With xhat = (x - mean) * rstd and g = dy * w (w = 1 without weight):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: without the mean(g) term)
//   dw += dy * xhat, db += dy, per column, accumulated in the same pass while the row is in L1.
// One vector of the backward at element i (n < 0: a full vector; else the first n elements).
template <NormKind K, WMode kW, typename V, typename T, typename P>
struct BwdVec {
  V dy;
  V xhat;
  V g;
  static BwdVec load(const T* xr, const T* dyr, const P* w, int64_t i, int n, const V& vmean,
                     const V& vrstd) {
    BwdVec b;
    const V xv = n < 0 ? V::load(xr + i) : V::load_partial(xr + i, n);
    b.dy = n < 0 ? V::load(dyr + i) : V::load_partial(dyr + i, n);
    b.xhat = K == NormKind::kLayerNorm ? (xv - vmean) * vrstd : xv * vrstd;
    if (n >= 0) b.xhat = b.xhat.first(n);
    b.g = b.dy;
    if constexpr (kW != WMode::kNone) {
      b.g = b.dy * effective_weight<kW>(n < 0 ? V::load(w + i) : V::load_partial(w + i, n));
    }
    return b;
  }
};

// Short rows (at most kShortBwdRowVectors vectors), R at a time. Each row gets exactly the
// instructions of the one-row version (R = 1), so a row's result never depends on which rows
// share a task; the R independent chains hide the latency of each row's reductions, and per
// vector w is loaded, and the dγ / dβ partials read and written, once for all R rows (the rows
// are added in row order, as row by row, so the partials are unchanged). Sums: one accumulator
// pair per row (the row is at most kShortBwdRowVectors vectors), the tail as a masked vector.
template <int R, NormKind K, WMode kW, typename T, typename P, typename A = acc_t<T>>
inline void bwd_short_rows(const BwdParams& p, const P* w, int64_t r0, A* dw_acc, A* db_acc) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  constexpr bool kLN = K == NormKind::kLayerNorm;
  const int64_t N = p.N;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  const T* xr[R];
  const T* dyr[R];
  V vmean[R], vrstd[R], sg[R], sgx[R];
  for (int k = 0; k < R; ++k) {
    const int64_t r = r0 + k;
    xr[k] = static_cast<const T*>(p.x) + r * p.x_stride;
    dyr[k] = static_cast<const T*>(p.dy) + r * p.dy_stride;
    vmean[k] = V::set1(kLN ? static_cast<const A*>(p.mean)[r] : A(0));
    vrstd[k] = V::set1(static_cast<const A*>(p.rstd)[r]);
    sg[k] = V::zero();
    sgx[k] = V::zero();
  }
  auto load = [](const auto* ptr, int64_t i, int n) {
    return n < 0 ? V::load(ptr + i) : V::load_partial(ptr + i, n);
  };
  // Stores a full (n < 0) or partial vector; nothing for a null destination.
  auto store_any = [](const V& v, auto* ptr, int64_t i, int n) {
    if (ptr == nullptr) return;
    if (n < 0) {
      v.store(ptr + i);
    } else {
      v.store_partial(ptr + i, n);
    }
  };
  auto weight = [&](int64_t i, int n) {
    if constexpr (kW != WMode::kNone) {
      return effective_weight<kW>(load(w, i, n));
    } else {
      return V::zero();
    }
  };
  auto xhat_of = [&](const V& xv, int k, int n) {
    V xhat = kLN ? (xv - vmean[k]) * vrstd[k] : xv * vrstd[k];
    if (n >= 0) xhat = xhat.first(n);
    return xhat;
  };
  auto grad_of = [&](const V& dyv, const V& wv) {
    if constexpr (kW != WMode::kNone) {
      return V(dyv * wv);
    } else {
      return dyv;
    }
  };
  // Pass 1: sum(g), sum(g * xhat), and the parameter-gradient partials.
  auto pass1 = [&](int64_t i, int n) {
    const V wv = weight(i, n);
    V dw = dw_acc != nullptr ? load(dw_acc, i, n) : V::zero();
    V db = db_acc != nullptr ? load(db_acc, i, n) : V::zero();
    for (int k = 0; k < R; ++k) {
      const V dyv = load(dyr[k], i, n);
      const V xhat = xhat_of(load(xr[k], i, n), k, n);
      const V g = grad_of(dyv, wv);
      sg[k] = sg[k] + g;
      sgx[k] = madd(g, xhat, sgx[k]);
      dw = madd(dyv, xhat, dw);
      db = db + dyv;
    }
    store_any(dw, dw_acc, i, n);
    store_any(db, db_acc, i, n);
  };
  for (int64_t v = 0; v < nfull; ++v) pass1(v * L, -1);
  if (tail > 0) pass1(nfull * L, tail);
  if (p.dx == nullptr) {
    return;
  }
  // Pass 2: dx = rstd * ((g - mean(g)) - xhat * mean(g * xhat)) (+ the residual's gradient).
  const A inv_n = A(1) / static_cast<A>(N);
  T* dxr[R];
  const T* dresr[R];
  V vmean_g[R], vneg_mean_gx[R];
  for (int k = 0; k < R; ++k) {
    const int64_t r = r0 + k;
    dxr[k] = static_cast<T*>(p.dx) + r * p.dx_stride;
    dresr[k] = p.grad_residual != nullptr
                   ? static_cast<const T*>(p.grad_residual) + r * p.grad_residual_stride
                   : nullptr;
    vmean_g[k] = V::set1(kLN ? sg[k].sum() * inv_n : A(0));
    vneg_mean_gx[k] = V::set1(-(sgx[k].sum() * inv_n));
  }
  auto pass2 = [&](int64_t i, int n) {
    const V wv = weight(i, n);
    // Every load of a step before its stores: rows are often a multiple of 4 KiB apart, and a
    // load issued after a store to the same address modulo 4 KiB waits for it.
    V xv[R], dyv[R];
    for (int k = 0; k < R; ++k) {
      xv[k] = load(xr[k], i, n);
      dyv[k] = load(dyr[k], i, n);
    }
    for (int k = 0; k < R; ++k) {
      const V xhat = xhat_of(xv[k], k, n);
      const V g = grad_of(dyv[k], wv);
      V dx = madd(xhat, vneg_mean_gx[k], g - vmean_g[k]) * vrstd[k];
      if (dresr[k] != nullptr) dx = dx + load(dresr[k], i, n);
      store_any(dx, dxr[k], i, n);
    }
  };
  for (int64_t v = 0; v < nfull; ++v) pass2(v * L, -1);
  if (tail > 0) pass2(nfull * L, tail);
}

// Pass 1 of R long rows at once: per row, sum(g) and sum(g * xhat) in blocked pairwise form (two
// accumulator pairs per chunk of kChunk vectors, chunk totals into the cascade `cs`), by exactly
// the instructions of R = 1; and the parameter-gradient partials, read and written once per
// vector for all R rows (the rows added in row order, so the partials are those of row by row).
template <int R, NormKind K, WMode kW, typename T, typename P, typename A = acc_t<T>>
inline void bwd_long_pass1(const T* const* xr, const T* const* dyr, const Vec<A>* vmean,
                           const Vec<A>* vrstd, const P* w, int64_t N, A* dw_acc, A* db_acc,
                           CascadeSum<Vec<A>, 2>* cs) {
  using V = Vec<A>;
  using BV = BwdVec<K, kW, V, T, P>;
  constexpr int L = V::kSize;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  auto partials = [&](const BV* b, int64_t i, int n) {
    if (dw_acc != nullptr) {
      V acc = n < 0 ? V::load(dw_acc + i) : V::load_partial(dw_acc + i, n);
      for (int k = 0; k < R; ++k) acc = madd(b[k].dy, b[k].xhat, acc);
      if (n < 0) {
        acc.store(dw_acc + i);
      } else {
        acc.store_partial(dw_acc + i, n);
      }
    }
    if (db_acc != nullptr) {
      V acc = n < 0 ? V::load(db_acc + i) : V::load_partial(db_acc + i, n);
      for (int k = 0; k < R; ++k) acc = acc + b[k].dy;
      if (n < 0) {
        acc.store(db_acc + i);
      } else {
        acc.store_partial(db_acc + i, n);
      }
    }
  };
  int64_t v = 0;
  while (v < nfull) {
    const int64_t chunk_end = std::min(nfull, v + kChunk);
    // Even / odd vectors into two accumulator pairs per row, indexed statically (registers).
    V g0[R], gx0[R], g1[R], gx1[R];
    for (int k = 0; k < R; ++k) g0[k] = gx0[k] = g1[k] = gx1[k] = V::zero();
    for (; v + 2 <= chunk_end; v += 2) {
      BV b0[R], b1[R];
      for (int k = 0; k < R; ++k) {
        b0[k] = BV::load(xr[k], dyr[k], w, v * L, -1, vmean[k], vrstd[k]);
        b1[k] = BV::load(xr[k], dyr[k], w, (v + 1) * L, -1, vmean[k], vrstd[k]);
        g0[k] = g0[k] + b0[k].g;
        gx0[k] = madd(b0[k].g, b0[k].xhat, gx0[k]);
        g1[k] = g1[k] + b1[k].g;
        gx1[k] = madd(b1[k].g, b1[k].xhat, gx1[k]);
      }
      partials(b0, v * L, -1);
      partials(b1, (v + 1) * L, -1);
    }
    if (v < chunk_end) {
      BV b0[R];
      for (int k = 0; k < R; ++k) {
        b0[k] = BV::load(xr[k], dyr[k], w, v * L, -1, vmean[k], vrstd[k]);
        g0[k] = g0[k] + b0[k].g;
        gx0[k] = madd(b0[k].g, b0[k].xhat, gx0[k]);
      }
      partials(b0, v * L, -1);
      ++v;
    }
    for (int k = 0; k < R; ++k) {
      cs[k].chunk[0] = g0[k] + g1[k];
      cs[k].chunk[1] = gx0[k] + gx1[k];
      cs[k].in_chunk = kChunk - 1;
      cs[k].step();
    }
  }
  if (tail > 0) {
    BV b[R];
    for (int k = 0; k < R; ++k) {
      b[k] = BV::load(xr[k], dyr[k], w, nfull * L, tail, vmean[k], vrstd[k]);
      cs[k].chunk[0] = cs[k].chunk[0] + b[k].g;
      cs[k].chunk[1] = madd(b[k].g, b[k].xhat, cs[k].chunk[1]);
    }
    partials(b, nfull * L, tail);
  }
}

template <NormKind K, WMode kW, typename T, typename P>
void bwd_rows_impl(const BwdParams& p, const P* w, int64_t begin, int64_t end, acc_t<T>* dw_acc,
                   acc_t<T>* db_acc) {
  if (is_short_bwd_row<acc_t<T>>(p.N)) {
    // Four rows interleaved share the loads of w and of the parameter-gradient partials, which
    // pays while x and dy come from L2. From beyond it, the four interleaved streams per tensor
    // defeated the hardware prefetcher: one thread, N = 128 fp32, x of 8 MiB took 2349 us four
    // at a time, 1427 us one by one (4 MiB: 1239 vs 523; ATen ~1000 us at 8 MiB). Software
    // prefetch of the next four rows recovered only a fifth of that.
    constexpr int kGroup = 4;
    int64_t r = begin;
    if (!p.short_rows_one_by_one) {
      for (; r + kGroup <= end; r += kGroup)
        bwd_short_rows<kGroup, K, kW, T>(p, w, r, dw_acc, db_acc);
    }
    for (; r < end; ++r) bwd_short_rows<1, K, kW, T>(p, w, r, dw_acc, db_acc);
    return;
  }
  using A = acc_t<T>;
  using V = Vec<A>;
  using BV = BwdVec<K, kW, V, T, P>;
  constexpr int L = V::kSize;
  constexpr bool kLN = K == NormKind::kLayerNorm;
  const int64_t N = p.N;
  const int64_t nfull = N / L;
  const int tail = static_cast<int>(N % L);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  const T* dres = static_cast<const T*>(p.grad_residual);
  const A inv_n = A(1) / static_cast<A>(N);

  // Rows whose x and dy exceed L1 (pass 2 re-reads them from L2 anyway) go two at a time:
  // pass 1 of both (one read-modify-write of the partials per vector for both rows), then pass 2
  // of each. Smaller rows one at a time, which keeps pass 2 in L1 (measured: pairing them was
  // 3-4% slower at N = 768-2048 fp32, 9-11% faster at N = 4096-8192).
  const bool pairs = 2 * N * int64_t{sizeof(T)} > kL1Bytes;
  for (int64_t r0 = begin, g = 1; r0 < end; r0 += g) {
    g = pairs && end - r0 >= 2 ? 2 : 1;
    const T* xrs[2];
    const T* dyrs[2];
    V vmeans[2], vrstds[2];
    CascadeSum<V, 2> css[2];
    for (int k = 0; k < g; ++k) {
      const int64_t r = r0 + k;
      xrs[k] = x + r * p.x_stride;
      dyrs[k] = dy + r * p.dy_stride;
      vmeans[k] = V::set1(kLN ? mean_in[r] : A(0));
      vrstds[k] = V::set1(rstd_in[r]);
    }
    if (g == 2) {
      bwd_long_pass1<2, K, kW, T>(xrs, dyrs, vmeans, vrstds, w, N, dw_acc, db_acc, css);
    } else {
      bwd_long_pass1<1, K, kW, T>(xrs, dyrs, vmeans, vrstds, w, N, dw_acc, db_acc, css);
    }
    for (int k = 0; k < g; ++k) {
      const int64_t r = r0 + k;
      const T* xr = xrs[k];
      const T* dyr = dyrs[k];
      const V& vmean = vmeans[k];
      const V& vrstd = vrstds[k];
      const CascadeSum<V, 2>& cs = css[k];
      if (dx == nullptr) {
        continue;
      }
      A sums[2];
      cascade_finish(cs, sums);

      // Pass 2: dx = rstd * ((g - mean(g)) - xhat * mean(g * xhat)), the row still in cache.
      const V vmean_g = V::set1(kLN ? sums[0] * inv_n : A(0));
      const V vneg_mean_gx = V::set1(-(sums[1] * inv_n));
      T* dxr = dx + r * p.dx_stride;
      // Fused residual: the gradient reaching the sum s = x + residual is the norm's dx plus the
      // gradient of residual_out, added in fp32 before the single rounding.
      const T* dresr = dres != nullptr ? dres + r * p.grad_residual_stride : nullptr;
      auto dx_vec = [&](int64_t v) {
        const BV b = BV::load(xr, dyr, w, v * L, -1, vmean, vrstd);
        V g = madd(b.xhat, vneg_mean_gx, b.g - vmean_g) * vrstd;
        if (dresr != nullptr) g = g + V::load(dresr + v * L);
        return g;
      };
      int64_t v = 0;
      if constexpr (kPairStores<V, T>) {
        // bf16 on AVX-512: two vectors rounded and stored at once (store_pair, vec.h).
        // Measured (harness, 1 thread, Xeon Skylake-SP, cycles per 16 elements, two runs):
        // LayerNorm 512 x 768 25.4 / 35.0 -> 23.8 / 31.9, 64 x 4096 38.0 / 39.9 -> 36.9 / 37.4,
        // RMSNorm 512 x 1024 21.8 -> 20.9. (Short rows keep one vector per step: pairing their
        // interleaved rows measured no faster, 512 x 256 27.3 -> 28.0.)
        for (; v + 2 <= nfull; v += 2) store_pair<false>(dx_vec(v), dx_vec(v + 1), dxr + v * L);
      }
      for (; v < nfull; ++v) dx_vec(v).store(dxr + v * L);
      if (tail > 0) {
        const BV b = BV::load(xr, dyr, w, nfull * L, tail, vmean, vrstd);
        V g = madd(b.xhat, vneg_mean_gx, b.g - vmean_g) * vrstd;
        if (dresr != nullptr) g = g + V::load_partial(dresr + nfull * L, tail);
        g.store_partial(dxr + nfull * L, tail);
      }
    }
  }
}

// fp16 / bf16 weights are widened to fp32 once per task, as in the forward.
template <NormKind K, WMode kW, typename T, typename P>
void bwd_rows(const BwdParams& p, int64_t begin, int64_t end, void* dw_acc, void* db_acc) {
  using A = acc_t<T>;
  const P* w = static_cast<const P*>(p.weight);
  A* dwa = static_cast<A*>(dw_acc);
  A* dba = static_cast<A*>(db_acc);
  if constexpr (!std::is_same_v<P, A> && kW != WMode::kNone) {
    if (end - begin > 1) {
      using V = Vec<A>;
      constexpr int L = V::kSize;
      const int64_t N = p.N;
      std::unique_ptr<A[]> wf(new A[N]);
      int64_t i = 0;
      for (; i + L <= N; i += L) effective_weight<kW>(V::load(w + i)).store(wf.get() + i);
      if (i < N) {
        const int n = static_cast<int>(N - i);
        effective_weight<kW>(V::load_partial(w + i, n)).store_partial(wf.get() + i, n);
      }
      return bwd_rows_impl<K, WMode::kPlain, T, A>(p, wf.get(), begin, end, dwa, dba);
    }
  }
  bwd_rows_impl<K, kW, T, P>(p, w, begin, end, dwa, dba);
}

// Column sums of partial rows in a fixed pairwise tree, then a single rounding to P.
template <typename T, typename P>
void column_sum(void* partials_v, int64_t count, int64_t ld, int64_t col_begin, int64_t col_end,
                void* out_v) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int L = V::kSize;
  A* partials = static_cast<A*>(partials_v);
  P* out = static_cast<P*>(out_v);
  for (int64_t stride = 1; stride < count; stride *= 2) {
    for (int64_t r = 0; r + stride < count; r += 2 * stride) {
      A* dst = partials + r * ld;
      const A* src = partials + (r + stride) * ld;
      int64_t j = col_begin;
      for (; j + L <= col_end; j += L) (V::load(dst + j) + V::load(src + j)).store(dst + j);
      for (; j < col_end; ++j) dst[j] += src[j];
    }
  }
  for (int64_t j = col_begin; j < col_end; ++j) store_acc(out + j, partials[j]);
}

// --- Entry points: one per (kind, dtype combo); presence of w / b picked once per call. ----------

template <NormKind K, typename T, typename P>
void fwd_entry(const FwdParams& p, int64_t begin, int64_t end) {
  const bool has_w = p.weight != nullptr;
  const bool has_b = K == NormKind::kLayerNorm && p.bias != nullptr;
  if (has_w && p.zero_centered_weight) {
    return has_b ? fwd_rows<K, WMode::kPlusOne, true, T, P>(p, begin, end)
                 : fwd_rows<K, WMode::kPlusOne, false, T, P>(p, begin, end);
  }
  if (has_w) {
    return has_b ? fwd_rows<K, WMode::kPlain, true, T, P>(p, begin, end)
                 : fwd_rows<K, WMode::kPlain, false, T, P>(p, begin, end);
  }
  return has_b ? fwd_rows<K, WMode::kNone, true, T, P>(p, begin, end)
               : fwd_rows<K, WMode::kNone, false, T, P>(p, begin, end);
}

template <NormKind K, typename T, typename P>
void bwd_entry(const BwdParams& p, int64_t begin, int64_t end, void* dw_acc, void* db_acc) {
  if (p.weight == nullptr) {
    return bwd_rows<K, WMode::kNone, T, P>(p, begin, end, dw_acc, db_acc);
  }
  if (p.zero_centered_weight) {
    return bwd_rows<K, WMode::kPlusOne, T, P>(p, begin, end, dw_acc, db_acc);
  }
  return bwd_rows<K, WMode::kPlain, T, P>(p, begin, end, dw_acc, db_acc);
}

template <NormKind K>
void fill_kind(KernelTable& t) {
  constexpr int k = static_cast<int>(K);
  t.fwd[k][static_cast<int>(DTypeCombo::kFloat)] = &fwd_entry<K, float, float>;
  t.fwd[k][static_cast<int>(DTypeCombo::kDouble)] = &fwd_entry<K, double, double>;
  t.fwd[k][static_cast<int>(DTypeCombo::kHalf)] = &fwd_entry<K, Half, Half>;
  t.fwd[k][static_cast<int>(DTypeCombo::kBFloat16)] = &fwd_entry<K, BFloat16, BFloat16>;
  t.fwd[k][static_cast<int>(DTypeCombo::kHalfFloat)] = &fwd_entry<K, Half, float>;
  t.fwd[k][static_cast<int>(DTypeCombo::kBFloat16Float)] = &fwd_entry<K, BFloat16, float>;
  t.bwd[k][static_cast<int>(DTypeCombo::kFloat)] = &bwd_entry<K, float, float>;
  t.bwd[k][static_cast<int>(DTypeCombo::kDouble)] = &bwd_entry<K, double, double>;
  t.bwd[k][static_cast<int>(DTypeCombo::kHalf)] = &bwd_entry<K, Half, Half>;
  t.bwd[k][static_cast<int>(DTypeCombo::kBFloat16)] = &bwd_entry<K, BFloat16, BFloat16>;
  t.bwd[k][static_cast<int>(DTypeCombo::kHalfFloat)] = &bwd_entry<K, Half, float>;
  t.bwd[k][static_cast<int>(DTypeCombo::kBFloat16Float)] = &bwd_entry<K, BFloat16, float>;
}

KernelTable make_table() {
  KernelTable t{};
#define LNEXT_STR2(x) #x
#define LNEXT_STR(x) LNEXT_STR2(x)
  t.name = LNEXT_STR(LNEXT_CPU_CAPABILITY);
#undef LNEXT_STR
#undef LNEXT_STR2
  fill_kind<NormKind::kLayerNorm>(t);
  fill_kind<NormKind::kRMSNorm>(t);
  t.column_sum[static_cast<int>(DTypeCombo::kFloat)] = &column_sum<float, float>;
  t.column_sum[static_cast<int>(DTypeCombo::kDouble)] = &column_sum<double, double>;
  t.column_sum[static_cast<int>(DTypeCombo::kHalf)] = &column_sum<Half, Half>;
  t.column_sum[static_cast<int>(DTypeCombo::kBFloat16)] = &column_sum<BFloat16, BFloat16>;
  t.column_sum[static_cast<int>(DTypeCombo::kHalfFloat)] = &column_sum<Half, float>;
  t.column_sum[static_cast<int>(DTypeCombo::kBFloat16Float)] = &column_sum<BFloat16, float>;
  return t;
}

}  // namespace
}  // namespace LNEXT_CPU_CAPABILITY

#define LNEXT_CAT2(a, b) a##b
#define LNEXT_CAT(a, b) LNEXT_CAT2(a, b)
const KernelTable& LNEXT_CAT(kernel_table_, LNEXT_CPU_CAPABILITY)() {
  static const KernelTable table = make_table();
  return table;
}

}  // namespace layernorm_ext::cpu
