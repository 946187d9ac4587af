// Backward kernels (LayerNorm and RMSNorm), included only by the inst/bwd_*.cu units.
//
// With xhat = (x - mean) * rstd (RMSNorm: x * rstd) and g = dy * w (w = 1 without weight):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (RMSNorm: without the mean(g) term)
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy.
// The same expressions, in the same association, as cpu/norm_krnl.cpp.
// Fused residual add (p.grad_residual != null, a run-time choice): the gradient reaching
// s = x + residual is dx plus the gradient of residual_out, added in the accumulation type to
// dx's rounded product (acc_mul: never contracted into an FMA) before the single rounding, as
// the CPU kernels do. For fp32 / fp64 that is bitwise dx, then + grad_residual.
//
// Parameter gradients are deterministic without atomics (kernels.md §3.4):
//  * register tier: the dx kernel is persistent. Block b owns the fixed row range
//    [b * rows_per_block, (b + 1) * rows_per_block); each thread keeps dw / db for the columns it
//    owns in registers across those rows, the block's row groups are merged in shared memory in
//    a fixed tree, and the block writes row b of partial[blocks, N] once;
//  * sweep tier: param_grad_partial_kernel (param_grad.cuh) sums fixed row chunks per column;
//  * column_sum_kernel adds the partial rows of each column in a fixed order and rounds once.
// The number of blocks depends on (M, N, dtypes) and on the device's SM count and occupancy: the
// parameter gradients are bitwise reproducible run to run on one GPU model, and may differ in the
// last bits across GPU models. dx never depends on the partition (batch-invariant).
//
// Assumptions (checked by the launcher): N >= 1, M >= 1, pointers / N / strides compatible with
// p.width; dx (when requested) is contiguous.
#pragma once

#include <type_traits>

#include "kernel_api.h"
#include "reduce.cuh"
#include "vec_io.cuh"

namespace layernorm_ext::cuda {
// Internal linkage, as in fwd_kernels.cuh.
namespace {

// xhat and g of one pack, plus the thread's running sums (sum g, sum g * xhat) over valid
// elements. Returns dy widened in `dyv` for the parameter gradients.
template <Kind K, WMode kW, typename A, typename T, typename Pt, int P>
__device__ __forceinline__ void bwd_pack(const Pack<T, P>& xr, const Pack<T, P>& dyr,
                                         const Pack<Pt, P>& wr, int valid, A mean, A rstd,
                                         A (&xhat)[P], A (&g)[P], A (&dyv)[P], A (&sums)[2]) {
#pragma unroll
  for (int e = 0; e < P; ++e) {
    const A xv = to_acc<A>(xr.v[e]);
    dyv[e] = to_acc<A>(dyr.v[e]);
    xhat[e] = K == Kind::kLayerNorm ? (xv - mean) * rstd : xv * rstd;
    g[e] = dyv[e];
    if constexpr (kW != WMode::kNone) g[e] = dyv[e] * effective_weight<kW>(to_acc<A>(wr.v[e]));
    if (e < valid) {
      sums[0] += g[e];
      sums[1] = acc_fma(g[e], xhat[e], sums[1]);
    }
  }
}

// dx of one pack: (xhat * -mean(g * xhat) + (g - mean(g))) * rstd (+ the residual gradient
// `gr`, already loaded, when `add`: a run-time choice, uniform over the grid), rounded once.
// Without it nothing is added (not even a zero, which would turn -0 into +0).
template <typename A, typename T, int P>
__device__ __forceinline__ void store_dx(T* dx, const A (&xhat)[P], const A (&g)[P], A mean_g,
                                         A neg_mean_gx, A rstd, bool add, const Pack<T, P>& gr,
                                         int width, int valid) {
  Pack<T, P> out;
#pragma unroll
  for (int e = 0; e < P; ++e) {
    A d = acc_mul(acc_fma(xhat[e], neg_mean_gx, g[e] - mean_g), rstd);
    if (add) d = d + to_acc<A>(gr.v[e]);
    out.v[e] = from_acc<T>(d);
  }
  store_pack(dx, out, width, valid);
}

template <typename A>
struct alignas(16) PairScratch {
  A v[kMaxWarps + 1][2];
};

// Writes row blockIdx.x of a partial buffer from per-thread column accumulators: directly when
// the block is one row group (each column has one owner), else after a fixed pairwise tree over
// the row groups in shared memory (buf: groups * C values, C = columns per group).
template <typename A, int kPacks, int P>
__device__ __forceinline__ void write_partial(A* partial, const A (&acc)[kPacks][P], const Group& g,
                                              int N, A* buf) {
  A* out = partial + static_cast<int64_t>(blockIdx.x) * N;
  if (g.count == 1) {
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const int col = (i * g.size + g.lane) * P + e;
        if (col < N) out[col] = acc[i][e];
      }
    }
    return;
  }
  const int C = g.size * kPacks * P;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
#pragma unroll
    for (int e = 0; e < P; ++e) buf[g.index * C + (i * g.size + g.lane) * P + e] = acc[i][e];
  }
  __syncthreads();
  const int total = g.count * C;
  for (int s = 1; s < g.count; s <<= 1) {
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
      const int grp = idx / C;
      if ((grp & (2 * s - 1)) == 0 && grp + s < g.count) buf[idx] += buf[idx + s * C];
    }
    __syncthreads();
  }
  for (int col = threadIdx.x; col < N; col += blockDim.x) out[col] = buf[col];
  __syncthreads();  // buf is reused by the next call
}

// --- Register tier (persistent, fused parameter-gradient partials) ------------------------------
//
// Same mapping as the forward register tier. Registers per thread: xhat, g, dw and db for
// kPacks * P values (bwd_max_packs bounds that at 16, or 8 for fp64).
template <Kind K, WMode kW, typename T, typename Pt, int kPacks>
__global__ void __launch_bounds__(kRegMaxThreads, 1) bwd_register_kernel(const BwdParams p) {
  using A = acc_t<T>;
  constexpr int P = kPackOf<T>;
  extern __shared__ uint4 dynamic_smem[];
  __shared__ PairScratch<A> scratch;
  const Group g = make_group(p.log2_group);
  const int N = static_cast<int>(p.N);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const Pt* w = static_cast<const Pt*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const T* gres = static_cast<const T*>(p.grad_residual);
  const A inv_n = A(1) / static_cast<A>(N);

  int cols[kPacks];
  int owned[kPacks];  // valid elements of each owned pack (a thread's columns never change)
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    cols[i] = (i * g.size + g.lane) * P;
    owned[i] = pack_valid(cols[i], N, P);
  }
  A dw[kPacks][P];
  A db[kPacks][P];
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
#pragma unroll
    for (int e = 0; e < P; ++e) {
      dw[i][e] = A(0);
      db[i][e] = A(0);
    }
  }

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_block;
  const int64_t end = begin + p.rows_per_block < p.M ? begin + p.rows_per_block : p.M;
  for (int64_t base = begin; base < end; base += g.count) {
    const int64_t row = base + g.index;
    const bool active = row < end;
    A mean = A(0);
    A rstd = A(0);
    if (active) {
      if constexpr (K == Kind::kLayerNorm) mean = mean_in[row];
      rstd = rstd_in[row];
    }
    A xhat[kPacks][P];
    A gv[kPacks][P];
    A sums[2] = {A(0), A(0)};
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int valid = active ? owned[i] : 0;
      Pack<T, P> xr = zero_pack<T, P>();
      Pack<T, P> dyr = zero_pack<T, P>();
      Pack<Pt, P> wr = zero_pack<Pt, P>();
      if (valid > 0) {
        load_pack(xr, x + row * p.x_stride + cols[i], p.width, valid);
        load_pack(dyr, dy + row * p.dy_stride + cols[i], p.width, valid);
        if constexpr (kW != WMode::kNone) load_pack(wr, w + cols[i], p.width, valid);
      }
      A dyv[P];
      bwd_pack<K, kW>(xr, dyr, wr, valid, mean, rstd, xhat[i], gv[i], dyv, sums);
#pragma unroll
      for (int e = 0; e < P; ++e) {
        if (e < valid) {
          dw[i][e] = acc_fma(dyv[e], xhat[i][e], dw[i][e]);
          db[i][e] += dyv[e];
        }
      }
    }
    group_sum<A, 2>(sums, g, scratch.v);
    if (!active || dx == nullptr) {
      continue;  // nothing below synchronises
    }
    // Fused residual gradient (only with dx): every pack loaded before the first dx store.
    Pack<T, P> grp[kPacks];
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      grp[i] = zero_pack<T, P>();
      if (gres != nullptr && owned[i] > 0) {
        load_pack(grp[i], gres + row * p.grad_residual_stride + cols[i], p.width, owned[i]);
      }
    }
    const A mean_g = K == Kind::kLayerNorm ? sums[0] * inv_n : A(0);
    const A neg_mean_gx = -(sums[1] * inv_n);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      if (owned[i] > 0) {
        store_dx(dx + row * N + cols[i], xhat[i], gv[i], mean_g, neg_mean_gx, rstd, gres != nullptr,
                 grp[i], p.width, owned[i]);
      }
    }
  }

  A* buf = reinterpret_cast<A*>(dynamic_smem);
  if (p.dw_partial != nullptr) write_partial(static_cast<A*>(p.dw_partial), dw, g, N, buf);
  if (p.db_partial != nullptr) write_partial(static_cast<A*>(p.db_partial), db, g, N, buf);
}

// --- Sweep tier (dx only) ------------------------------------------------------------------------
//
// Block per row, as the forward sweep: sweep 1 reads x and dy (parking them in shared memory when
// p.cache) and reduces (sum g, sum g * xhat); sweep 2 recomputes xhat and g and writes dx.
template <Kind K, WMode kW, typename T, typename Pt>
__global__ void __launch_bounds__(kSweepThreads, 1) bwd_sweep_kernel(const BwdParams p) {
  using A = acc_t<T>;
  constexpr int P = kPackOf<T>;
  constexpr int U = kSweepUnroll;
  extern __shared__ uint4 dynamic_smem[];
  __shared__ PairScratch<A> scratch;
  const int64_t N = p.N;
  const int64_t packs = (N + P - 1) / P;
  Pack<T, P>* x_cache = reinterpret_cast<Pack<T, P>*>(dynamic_smem);
  Pack<T, P>* dy_cache = x_cache + packs;
  const int64_t B = blockDim.x;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const Pt* w = static_cast<const Pt*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const T* gres = static_cast<const T*>(p.grad_residual);
  const A inv_n = A(1) / static_cast<A>(N);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = x + row * p.x_stride;
    const T* dyr = dy + row * p.dy_stride;
    const T* grr = gres != nullptr ? gres + row * p.grad_residual_stride : nullptr;
    const A mean = K == Kind::kLayerNorm ? mean_in[row] : A(0);
    const A rstd = rstd_in[row];
    A sums[2] = {A(0), A(0)};
    for (int pass = 0; pass < 2; ++pass) {
      A mean_g = A(0);
      A neg_mean_gx = A(0);
      if (pass == 1) {
        block_sum<A, 2>(sums, scratch.v);
        mean_g = K == Kind::kLayerNorm ? sums[0] * inv_n : A(0);
        neg_mean_gx = -(sums[1] * inv_n);
      }
      for (int64_t j0 = threadIdx.x; j0 < packs; j0 += U * B) {
        Pack<T, P> xp[U];
        Pack<T, P> dyp[U];
        Pack<T, P> grp[U];
        int valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t j = j0 + u * B;
          valid[u] = j < packs ? pack_valid(j * P, N, P) : 0;
          xp[u] = zero_pack<T, P>();
          dyp[u] = zero_pack<T, P>();
          grp[u] = zero_pack<T, P>();
          if (valid[u] > 0) {
            if (pass == 1 && p.cache) {
              xp[u] = x_cache[j];
              dyp[u] = dy_cache[j];
            } else {
              load_pack(xp[u], xr + j * P, p.width, valid[u]);
              load_pack(dyp[u], dyr + j * P, p.width, valid[u]);
            }
            if (pass == 1 && grr != nullptr) load_pack(grp[u], grr + j * P, p.width, valid[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (valid[u] == 0) continue;
          const int64_t j = j0 + u * B;
          if (pass == 0 && p.cache) {
            x_cache[j] = xp[u];
            dy_cache[j] = dyp[u];
          }
          Pack<Pt, P> wp = zero_pack<Pt, P>();
          if constexpr (kW != WMode::kNone) load_pack(wp, w + j * P, p.width, valid[u]);
          A xhat[P];
          A gv[P];
          A dyv[P];
          if (pass == 0) {
            bwd_pack<K, kW>(xp[u], dyp[u], wp, valid[u], mean, rstd, xhat, gv, dyv, sums);
          } else {
            A unused[2] = {A(0), A(0)};
            bwd_pack<K, kW>(xp[u], dyp[u], wp, valid[u], mean, rstd, xhat, gv, dyv, unused);
            store_dx(dx + row * N + j * P, xhat, gv, mean_g, neg_mean_gx, rstd, grr != nullptr,
                     grp[u], p.width, valid[u]);
          }
        }
      }
    }
  }
}

// --- Kernel sets
// ----------------------------------------------------------------------------------

template <Kind K, WMode kW, typename T, typename Pt>
BwdKernelSet bwd_set() {
  constexpr int kMaxPacks = bwd_max_packs(sizeof(T));
  static_assert(kMaxPacks >= 2 && kMaxPacks <= 4, "register tier instantiates 1..4 packs");
  BwdKernelSet s{};
  s.reg[0] = kernel_entry(&bwd_register_kernel<K, kW, T, Pt, 1>);
  s.reg[1] = kernel_entry(&bwd_register_kernel<K, kW, T, Pt, 2>);
  if constexpr (kMaxPacks >= 4) s.reg[2] = kernel_entry(&bwd_register_kernel<K, kW, T, Pt, 4>);
  s.sweep = kernel_entry(&bwd_sweep_kernel<K, kW, T, Pt>);
  return s;
}

// Without a weight the parameter dtype plays no part in dx: mixed-dtype calls then use the
// unmixed set (the launcher maps them), so it is not instantiated twice.
template <Kind K, typename T, typename Pt>
BwdKernelSet make_bwd_set(WMode wmode) {
  switch (wmode) {
    case WMode::kNone:
      if constexpr (!std::is_same_v<T, Pt>) {
        return {};
      } else {
        return bwd_set<K, WMode::kNone, T, Pt>();
      }
    case WMode::kPlain:
      return bwd_set<K, WMode::kPlain, T, Pt>();
    case WMode::kPlusOne:
      return bwd_set<K, WMode::kPlusOne, T, Pt>();
  }
  return {};
}

}  // namespace
}  // namespace layernorm_ext::cuda

// Defines the BwdKernelSet function NAME (declared in kernel_api.h) for one kind and dtype pair.
#define LNEXT_DEFINE_BWD_KERNELS(NAME, KIND, T, PT)                           \
  namespace layernorm_ext::cuda {                                             \
  BwdKernelSet NAME(WMode wmode) { return make_bwd_set<KIND, T, PT>(wmode); } \
  }
