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
//    fixed pairwise tree, the scalar tail (N mod L) merged last;
//  * RMSNorm's sum of squares uses the same chunk / cascade / lane-tree blocking;
//  * y = ((x - mean) * rstd) * w + b: never folded into x * scale + shift, so a constant row and
//    N == 1 give exactly b;
//  * a row's result depends only on that row, N, the dtypes and the ISA: never on the number of
//    rows, the row's position or the thread count.
// Compiled with -ffp-contract=off: every fused multiply-add below is explicit (madd).

#include <cmath>
#include <cstdint>
#include <cstring>
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

// Vectors per Welford chunk: long enough to amortise the merge, short enough that the running
// mean of a chunk does not drift (each lane sees at most kChunk values before a Chan merge).
constexpr int kChunk = 16;
// Cascade levels: level i holds kChunk * 2^i vectors per lane; 48 covers any int64 row length.
constexpr int kLevels = 48;

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
// the same count. Either side may be empty.
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
  const A ratio = static_cast<A>(nb) / static_cast<A>(n);
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

// Welford over one chunk of `count` (<= kChunk) vectors starting at x.
// Scalar math: d = x - m; m += d / (k + 1); q += d * (x - m_new).
template <typename T, typename V, typename A = acc_t<T>>
inline void welford_chunk(const T* x, int count, V& m, V& q) {
  constexpr int L = V::kSize;
  m = V::zero();
  q = V::zero();
  for (int k = 0; k < count; ++k) {
    const V xv = V::load(x + static_cast<int64_t>(k) * L);
    const V d = xv - m;
    m = madd(d, V::set1(kRecip<A>.r[k]), m);
    q = madd(d, xv - m, q);
  }
}

// Mean and population variance of one row.
template <typename T, typename A = acc_t<T>>
inline void row_moments(const T* x, int64_t N, A& mean_out, A& var_out) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const int64_t nvec = N / L;

  Welford<A> total{A(0), A(0), 0};
  if (nvec > 0) {
    // Full chunks feed a binary counter: two results of equal count merge and carry upward, so
    // every merge combines sets of similar size (pairwise error growth).
    V lvl_mean[kLevels];
    V lvl_m2[kLevels];
    uint64_t occupied = 0;
    int64_t v = 0;
    for (; v + kChunk <= nvec; v += kChunk) {
      V m, q;
      welford_chunk<T, V>(x + v * L, kChunk, m, q);
      int64_t n = kChunk;
      int lvl = 0;
      while ((occupied >> lvl) & 1u) {
        int64_t n_lvl = n;
        chan_merge<A>(m, q, n, lvl_mean[lvl], lvl_m2[lvl], n_lvl);
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
    int64_t n = nvec - v;
    if (n > 0) {
      welford_chunk<T, V>(x + v * L, static_cast<int>(n), m, q);
    }
    for (int lvl = 0; lvl < kLevels; ++lvl) {
      if ((occupied >> lvl) & 1u) {
        chan_merge<A>(m, q, n, lvl_mean[lvl], lvl_m2[lvl], int64_t{kChunk} << lvl);
      }
    }
    // Lanes: a fixed pairwise tree of equal-count merges.
    A lm[L];
    A lq[L];
    m.store_lanes(lm);
    q.store_lanes(lq);
    for (int width = L / 2; width >= 1; width /= 2) {
      for (int i = 0; i < width; ++i) {
        int64_t na = n;
        chan_merge<A>(lm[i], lq[i], na, lm[i + width], lq[i + width], n);
      }
      n *= 2;
    }
    total = Welford<A>{lm[0], lq[0], n};
  }
  // Scalar tail: fewer than L elements, merged last.
  Welford<A> tail{A(0), A(0), 0};
  for (int64_t i = nvec * L; i < N; ++i) {
    const A xv = load_acc(x + i);
    const A d = xv - tail.mean;
    tail.mean = madd(d, kRecip<A>.r[tail.n], tail.mean);
    tail.m2 = madd(d, xv - tail.mean, tail.m2);
    ++tail.n;
  }
  chan_merge<A>(total.mean, total.m2, total.n, tail.mean, tail.m2, tail.n);
  mean_out = total.mean;
  var_out = welford_variance(total.m2, total.n);
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

// Reduces the cascade and its partial chunk to S scalars (fixed order).
template <typename V, int S, typename A>
inline void cascade_finish(CascadeSum<V, S>& cs, A* out) {
  constexpr int L = V::kSize;
  V acc[S];
  for (int s = 0; s < S; ++s) acc[s] = cs.chunk[s];
  for (int lvl = 0; lvl < kLevels; ++lvl) {
    if ((cs.occupied >> lvl) & 1u) {
      for (int s = 0; s < S; ++s) acc[s] = acc[s] + cs.level[lvl][s];
    }
  }
  for (int s = 0; s < S; ++s) {
    A lanes[L];
    acc[s].store_lanes(lanes);
    for (int width = L / 2; width >= 1; width /= 2) {
      for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    }
    out[s] = lanes[0];
  }
}

// Mean of squares of one row (RMSNorm). Nothing cancels in a sum of squares, so plain blocked
// pairwise sums suffice.
template <typename T, typename A = acc_t<T>>
inline A row_mean_square(const T* x, int64_t N) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  A sum = A(0);
  int64_t i = 0;
  if (N >= L) {
    CascadeSum<V, 1> cs;
    for (; i + L <= N; i += L) {
      const V xv = V::load(x + i);
      cs.chunk[0] = madd(xv, xv, cs.chunk[0]);
      cs.step();
    }
    cascade_finish(cs, &sum);
  }
  A tail = A(0);
  for (; i < N; ++i) {
    const A xv = load_acc(x + i);
    tail = madd(xv, xv, tail);
  }
  return (sum + tail) / static_cast<A>(N);
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

// y = xhat * w + b with xhat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm, mean == 0).
template <NormKind K, WMode kW, bool kB, typename T, typename P, typename A = acc_t<T>>
inline void apply_row(const T* x, const P* w, const P* b, T* y, int64_t N, A mean, A rstd) {
  using V = Vec<A>;
  constexpr int L = V::kSize;
  const V vmean = V::set1(mean);
  const V vrstd = V::set1(rstd);
  int64_t i = 0;
  for (; i + L <= N; i += L) {
    const V xv = V::load(x + i);
    const V xhat = K == NormKind::kLayerNorm ? (xv - vmean) * vrstd : xv * vrstd;
    V out = xhat;
    if constexpr (kW != WMode::kNone) {
      const V wv = effective_weight<kW>(V::load(w + i));
      out = kB ? madd(xhat, wv, V::load(b + i)) : xhat * wv;
    } else if constexpr (kB) {
      out = xhat + V::load(b + i);
    }
    out.store(y + i);
  }
  // Scalar math: the same expression per element.
  for (; i < N; ++i) {
    const A xv = load_acc(x + i);
    const A xhat = K == NormKind::kLayerNorm ? (xv - mean) * rstd : xv * rstd;
    A out = xhat;
    if constexpr (kW != WMode::kNone) {
      A wv = load_acc(w + i);
      if constexpr (kW == WMode::kPlusOne) wv = wv + A(1);
      out = kB ? madd(xhat, wv, load_acc(b + i)) : xhat * wv;
    } else if constexpr (kB) {
      out = xhat + load_acc(b + i);
    }
    store_acc(y + i, out);
  }
}

template <NormKind K, WMode kW, bool kB, typename T, typename P>
void fwd_rows(const FwdParams& p, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  const int64_t N = p.N;
  const T* x = static_cast<const T*>(p.x);
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  T* y = static_cast<T*>(p.y);
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);
  const A eps = static_cast<A>(p.eps);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * p.x_stride;
    A mean = A(0);
    A rstd;
    if constexpr (K == NormKind::kLayerNorm) {
      A var;
      row_moments<T>(xr, N, mean, var);
      rstd = A(1) / std::sqrt(var + eps);
    } else {
      rstd = A(1) / std::sqrt(row_mean_square<T>(xr, N) + eps);
    }
    if (mean_out != nullptr) mean_out[r] = mean;
    if (rstd_out != nullptr) rstd_out[r] = rstd;
    apply_row<K, kW, kB>(xr, w, b, y + r * p.y_stride, N, mean, rstd);
  }
}

// --- Backward --------------------------------------------------------------------------------
//
// With xhat = (x - mean) * rstd and g = dy * w (w = 1 without weight):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: without the mean(g) term)
//   dw += dy * xhat, db += dy, per column, accumulated in the same pass while the row is in L1.
template <NormKind K, WMode kW, typename T, typename P>
void bwd_rows(const BwdParams& p, int64_t begin, int64_t end, void* dw_acc_v, void* db_acc_v) {
  using A = acc_t<T>;
  using V = Vec<A>;
  constexpr int L = V::kSize;
  constexpr bool kLN = K == NormKind::kLayerNorm;
  const int64_t N = p.N;
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const P* w = static_cast<const P*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  A* dw_acc = static_cast<A*>(dw_acc_v);
  A* db_acc = static_cast<A*>(db_acc_v);
  const A inv_n = A(1) / static_cast<A>(N);

  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * p.x_stride;
    const T* dyr = dy + r * p.dy_stride;
    const A mean = kLN ? mean_in[r] : A(0);
    const A rstd = rstd_in[r];
    const V vmean = V::set1(mean);
    const V vrstd = V::set1(rstd);

    // Pass 1: sums over the row (and the parameter-gradient partials).
    A sums[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
    int64_t i = 0;
    if (N >= L) {
      CascadeSum<V, 2> cs;
      for (; i + L <= N; i += L) {
        const V xv = V::load(xr + i);
        const V dyv = V::load(dyr + i);
        const V xhat = kLN ? (xv - vmean) * vrstd : xv * vrstd;
        V g = dyv;
        if constexpr (kW != WMode::kNone) g = dyv * effective_weight<kW>(V::load(w + i));
        cs.chunk[0] = cs.chunk[0] + g;
        cs.chunk[1] = madd(g, xhat, cs.chunk[1]);
        cs.step();
        if (dw_acc != nullptr) madd(dyv, xhat, V::load(dw_acc + i)).store(dw_acc + i);
        if (db_acc != nullptr) (V::load(db_acc + i) + dyv).store(db_acc + i);
      }
      cascade_finish(cs, sums);
    }
    A tail[2] = {A(0), A(0)};
    const int64_t body = i;
    // Scalar math: as above, per element.
    for (; i < N; ++i) {
      const A xv = load_acc(xr + i);
      const A dyv = load_acc(dyr + i);
      const A xhat = kLN ? (xv - mean) * rstd : xv * rstd;
      A g = dyv;
      if constexpr (kW != WMode::kNone) {
        A wv = load_acc(w + i);
        if constexpr (kW == WMode::kPlusOne) wv = wv + A(1);
        g = dyv * wv;
      }
      tail[0] += g;
      tail[1] = madd(g, xhat, tail[1]);
      if (dw_acc != nullptr) dw_acc[i] = madd(dyv, xhat, dw_acc[i]);
      if (db_acc != nullptr) db_acc[i] += dyv;
    }
    if (dx == nullptr) {
      continue;
    }
    // Pass 2: dx, with the row still in cache.
    const A mean_g = kLN ? (sums[0] + tail[0]) * inv_n : A(0);
    const A mean_gx = (sums[1] + tail[1]) * inv_n;
    const V vmean_g = V::set1(mean_g);
    const V vneg_mean_gx = V::set1(-mean_gx);
    T* dxr = dx + r * p.dx_stride;
    for (i = 0; i < body; i += L) {
      const V xv = V::load(xr + i);
      const V dyv = V::load(dyr + i);
      const V xhat = kLN ? (xv - vmean) * vrstd : xv * vrstd;
      V g = dyv;
      if constexpr (kW != WMode::kNone) g = dyv * effective_weight<kW>(V::load(w + i));
      (madd(xhat, vneg_mean_gx, g - vmean_g) * vrstd).store(dxr + i);
    }
    for (; i < N; ++i) {
      const A xv = load_acc(xr + i);
      const A dyv = load_acc(dyr + i);
      const A xhat = kLN ? (xv - mean) * rstd : xv * rstd;
      A g = dyv;
      if constexpr (kW != WMode::kNone) {
        A wv = load_acc(w + i);
        if constexpr (kW == WMode::kPlusOne) wv = wv + A(1);
        g = dyv * wv;
      }
      store_acc(dxr + i, madd(xhat, -mean_gx, g - mean_g) * rstd);
    }
  }
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
