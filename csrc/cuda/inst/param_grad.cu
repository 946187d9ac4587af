// Column kernels of the parameter gradients (kernels.md §3.4), both deterministic without atomics:
//  * param_grad_partial_kernel: dweight / dbias partial sums over fixed row chunks, one column per
//    lane (the sweep tier, whose rows are too long to keep per-column sums in registers);
//  * column_sum_kernel: the second stage of every tier, summing the partial rows of each column
//    in a fixed order (in passes of at most kColumnSumRows rows) and rounding once to the
//    parameter dtype.
// Both use blocks of a warp of consecutive columns times kColRowLanes row lanes; each lane sums its
// rows in order, then the row lanes are added in a fixed pairwise tree.

#include "../kernel_api.h"
#include "../reduce.cuh"
#include "../vec_io.cuh"

namespace layernorm_ext::cuda {
namespace {

constexpr int kColRowLanes = kColThreads / kWarpSize;
static_assert(kColRowLanes > 0 && (kColRowLanes & (kColRowLanes - 1)) == 0,
              "the row-lane tree needs a power of two");

// Adds red[q][ty][tx] over ty into red[q][0][tx] in a fixed pairwise tree.
template <typename A, int Q>
__device__ __forceinline__ void tree_over_rows(A (&red)[Q][kColRowLanes][kWarpSize], int tx,
                                               int ty) {
  __syncthreads();
#pragma unroll
  for (int s = kColRowLanes / 2; s > 0; s >>= 1) {
    if (ty < s) {
#pragma unroll
      for (int q = 0; q < Q; ++q) red[q][ty][tx] += red[q][ty + s][tx];
    }
    __syncthreads();
  }
}

// Block b: column tile b % tiles (kWarpSize columns), row chunk b / tiles. Writes row `chunk` of
// the partial buffers (every column < N of every chunk is written once).
template <Kind K, typename T>
__global__ void __launch_bounds__(kColThreads) param_grad_partial(const ParamGradParams p) {
  using A = acc_t<T>;
  __shared__ A red[2][kColRowLanes][kWarpSize];
  const int tx = static_cast<int>(threadIdx.x) % kWarpSize;
  const int ty = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % p.tiles;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) / p.tiles;
  const int64_t col = tile * kWarpSize + tx;
  const int64_t begin = chunk * p.rows_per_chunk;
  const int64_t end = begin + p.rows_per_chunk < p.M ? begin + p.rows_per_chunk : p.M;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);

  A dw = A(0);
  A db = A(0);
  if (col < p.N) {
#pragma unroll 4
    for (int64_t r = begin + ty; r < end; r += kColRowLanes) {
      const A xv = to_acc<A>(x[r * p.x_stride + col]);
      const A dyv = to_acc<A>(dy[r * p.dy_stride + col]);
      const A mean = K == Kind::kLayerNorm ? mean_in[r] : A(0);
      const A xhat = K == Kind::kLayerNorm ? (xv - mean) * rstd_in[r] : xv * rstd_in[r];
      dw = acc_fma(dyv, xhat, dw);
      db += dyv;
    }
  }
  red[0][ty][tx] = dw;
  red[1][ty][tx] = db;
  tree_over_rows<A, 2>(red, tx, ty);
  if (ty == 0 && col < p.N) {
    if (p.dw_partial != nullptr) static_cast<A*>(p.dw_partial)[chunk * p.N + col] = red[0][0][tx];
    if (p.db_partial != nullptr) static_cast<A*>(p.db_partial)[chunk * p.N + col] = red[1][0][tx];
  }
}

// One pass of the column sums (ColumnSumParams).
template <typename A, typename Pt>
__global__ void __launch_bounds__(kColThreads) column_sum(const ColumnSumParams p) {
  __shared__ A red[2][kColRowLanes][kWarpSize];
  const int tx = static_cast<int>(threadIdx.x) % kWarpSize;
  const int ty = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % p.tiles;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) / p.tiles;
  const int64_t col = tile * kWarpSize + tx;
  const int64_t begin = chunk * p.rows_per_chunk;
  const int64_t end = begin + p.rows_per_chunk < p.rows ? begin + p.rows_per_chunk : p.rows;
  const A* dw_in = static_cast<const A*>(p.dw_in);
  const A* db_in = static_cast<const A*>(p.db_in);
  A sw = A(0);
  A sb = A(0);
  if (col < p.N) {
    for (int64_t r = begin + ty; r < end; r += kColRowLanes) {
      if (dw_in != nullptr) sw += dw_in[r * p.N + col];
      if (db_in != nullptr) sb += db_in[r * p.N + col];
    }
  }
  red[0][ty][tx] = sw;
  red[1][ty][tx] = sb;
  tree_over_rows<A, 2>(red, tx, ty);
  if (ty != 0 || col >= p.N) {
    return;
  }
  const int64_t at = chunk * p.N + col;
  if (p.dw != nullptr) static_cast<Pt*>(p.dw)[col] = from_acc<Pt>(red[0][0][tx]);
  if (p.db != nullptr) static_cast<Pt*>(p.db)[col] = from_acc<Pt>(red[1][0][tx]);
  if (p.dw_partial != nullptr) static_cast<A*>(p.dw_partial)[at] = red[0][0][tx];
  if (p.db_partial != nullptr) static_cast<A*>(p.db_partial)[at] = red[1][0][tx];
}

}  // namespace

const void* param_grad_partial_kernel(Kind kind, int x_dtype) {
  const bool ln = kind == Kind::kLayerNorm;
  switch (x_dtype) {
    case 0:
      return ln ? kernel_entry(&param_grad_partial<Kind::kLayerNorm, float>)
                : kernel_entry(&param_grad_partial<Kind::kRMSNorm, float>);
    case 1:
      return ln ? kernel_entry(&param_grad_partial<Kind::kLayerNorm, double>)
                : kernel_entry(&param_grad_partial<Kind::kRMSNorm, double>);
    case 2:
      return ln ? kernel_entry(&param_grad_partial<Kind::kLayerNorm, __half>)
                : kernel_entry(&param_grad_partial<Kind::kRMSNorm, __half>);
    case 3:
      return ln ? kernel_entry(&param_grad_partial<Kind::kLayerNorm, __nv_bfloat16>)
                : kernel_entry(&param_grad_partial<Kind::kRMSNorm, __nv_bfloat16>);
    default:
      return nullptr;
  }
}

const void* column_sum_kernel(int combo) {
  switch (combo) {
    case 0:  // f32
    case 4:  // f16 input, f32 params
    case 5:  // bf16 input, f32 params
      return kernel_entry(&column_sum<float, float>);
    case 1:
      return kernel_entry(&column_sum<double, double>);
    case 2:
      return kernel_entry(&column_sum<float, __half>);
    case 3:
      return kernel_entry(&column_sum<float, __nv_bfloat16>);
    default:
      return nullptr;
  }
}

}  // namespace layernorm_ext::cuda
