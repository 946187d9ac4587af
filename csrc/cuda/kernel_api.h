// The interface between the CUDA launcher (norm_cuda.cpp: torch-facing, host-only) and the kernel
// instantiation units (inst/*.cu: torch-free). Plain C++ on purpose: the instantiation units then
// compile without parsing any ATen header (fast, parallel, incremental builds), and the launcher
// compiles with the host compiler alone.
//
// Tiers (chosen on the host from N and the dtypes only, never from the row count M, so results
// are batch-invariant; plan_rows() in norm_cuda.cpp):
//   register  a row lives in registers of a group of threads: a sub-warp / warp group
//             (1..32 threads, several rows per block) or the whole block (one row per block);
//   sweep     rows too long for registers: block per row, a statistics sweep then an apply sweep;
//             the row is kept in shared memory between the sweeps when it fits (opt-in dynamic
//             shared memory), else re-read. The cache never changes the arithmetic.
// The resulting ranges of N:
//                    warp / sub-warp     block, registers     sweep
//   fwd 16-bit       <= 1024             <= 16384             beyond (cached <= ~113K on H100)
//   fwd fp32         <= 512              <= 8192              beyond (cached <= ~56K)
//   fwd fp64         <= 256              <= 4096              beyond (cached <= ~28K)
//   bwd 16-bit/fp32  <= 512              <= 8192              beyond (x and dy cached: half)
//   bwd fp64         <= 256              <= 4096              beyond
#pragma once

#include <cstdint>

namespace layernorm_ext::cuda {

enum class Kind : int { kLayerNorm = 0, kRMSNorm = 1 };

// How the weight enters: absent, y = xhat * w, or y = xhat * (1 + w) (zero-centered / Gemma).
enum class WMode : int { kNone = 0, kPlain = 1, kPlusOne = 2 };

// Block sizes. A register-tier block is a whole number of warps of at most kRegMaxThreads
// threads; sub-warp groups run in blocks of kFwdGroupThreads / kBwdGroupThreads threads.
constexpr int kRegMaxThreads = 512;
constexpr int kFwdGroupThreads = 128;
constexpr int kBwdGroupThreads = 256;
constexpr int kSweepThreads = 512;
// Threads per block of the column kernels (a warp of columns times kColRowLanes rows).
constexpr int kColThreads = 256;
// Register-tier instantiations: 1, 2, 4 packs of 16 bytes of input per thread (slot i: 2^i).
constexpr int kPackSlots = 3;
// Packs loaded back to back by a sweep before they are used (memory-level parallelism).
constexpr int kSweepUnroll = 4;

// Elements per 16-byte pack of the input dtype.
constexpr int pack_elems(int x_elem_size) { return 16 / x_elem_size; }

// Most packs per thread held in registers by the register tier (the row in its storage type,
// 64 bytes of input per thread: 32 16-bit, 16 fp32 or 8 fp64 values). The backward also keeps
// xhat, g and the dweight / dbias accumulators per value in the accumulation type, so it holds
// 16 values (8 for fp64). Both budgets keep every instantiation below 128 registers without
// spills (the register tier's __launch_bounds__(512, 1) cap; see the -Xptxas -v report).
constexpr int fwd_max_packs(int /*x_elem_size*/) { return 4; }
constexpr int bwd_max_packs(int x_elem_size) { return x_elem_size == 2 ? 2 : 4; }

// Forward of M rows of N elements. Strides are in elements; pointers point at row 0 column 0.
struct FwdParams {
  const void* x;       // [M, N] input dtype, row stride x_stride
  const void* weight;  // [N] param dtype, or null
  const void* bias;    // [N] param dtype, or null (LayerNorm only)
  void* y;             // [M, N] input dtype, row stride y_stride
  void* mean;          // [M] accumulation type, or null
  void* rstd;          // [M] accumulation type, or null
  // Fused residual add, or null: s = x + residual (in the accumulation type, rounded once to the
  // input dtype) is written to residual_out and normalised in place of x. residual_out may be
  // residual itself (the in-place form) or x itself: each element is read before it is written,
  // by the thread that writes it, and nothing else reads it afterwards.
  const void* residual;  // [M, N] input dtype, row stride residual_stride
  void* residual_out;    // [M, N] input dtype, row stride residual_out_stride
  int64_t M;
  int64_t N;
  int64_t x_stride;
  int64_t y_stride;
  int64_t residual_stride;
  int64_t residual_out_stride;
  double eps;
  int width;       // elements per memory access: a power of two dividing the pack (host predicate)
  int log2_group;  // register tier: log2 of the threads per row (<= warp), or -1 for block per row
  int cache;       // sweep tier: 1 keeps the row in dynamic shared memory between the sweeps
};

// Backward: dx for each row and, in the register tier, per-block partial sums of dweight / dbias.
struct BwdParams {
  const void* dy;      // [M, N] input dtype, row stride dy_stride
  const void* x;       // [M, N] input dtype, row stride x_stride
  const void* mean;    // [M] accumulation type (LayerNorm), else null
  const void* rstd;    // [M] accumulation type
  const void* weight;  // [N] param dtype, or null
  void* dx;            // [M, N] input dtype, contiguous; null when not requested
  // Fused residual add, or null: the gradient of residual_out, added to dx in the accumulation
  // type before dx is rounded (only with dx).
  const void* grad_residual;  // [M, N] input dtype, row stride grad_residual_stride
  void* dw_partial;           // [gridDim.x, N] accumulation type, or null (register tier only)
  void* db_partial;           // [gridDim.x, N] accumulation type, or null (register tier only)
  int64_t M;
  int64_t N;
  int64_t dy_stride;
  int64_t x_stride;
  int64_t grad_residual_stride;
  int64_t rows_per_block;  // register tier: block b owns rows [b * rows_per_block, ...)
  int width;
  int log2_group;
  int cache;
};

// Rows of partial sums one column-sum block adds (the fan-in of each reduction pass).
constexpr int64_t kColumnSumRows = 64;

// Column-parallel partial sums of dweight = sum dy * xhat and dbias = sum dy over row chunks
// (the sweep tier's parameter gradients): block b handles column tile b % tiles of row chunk
// b / tiles and writes row `chunk` of the partial buffers.
struct ParamGradParams {
  const void* dy;
  const void* x;
  const void* mean;  // [M] (LayerNorm) or null
  const void* rstd;  // [M]
  void* dw_partial;  // [chunks, N] accumulation type, or null
  void* db_partial;  // [chunks, N] accumulation type, or null
  int64_t M;
  int64_t N;
  int64_t dy_stride;
  int64_t x_stride;
  int64_t rows_per_chunk;
  int64_t tiles;  // column tiles of one warp width
};

// Column sums of `rows` partial rows ([rows, N] accumulation type), in row chunks of
// rows_per_chunk: block b sums chunk b / tiles of column tile b % tiles in a fixed order. With one
// chunk the sums are rounded once to the param dtype (dw / db); with several they go to the next
// pass's partial rows (dw_partial / db_partial, [chunks, N]): every pass has tiles x chunks blocks,
// so a long partial buffer is reduced by many blocks, not by one block per column tile.
struct ColumnSumParams {
  const void* dw_in;  // [rows, N] accumulation type, or null
  const void* db_in;  // [rows, N] accumulation type, or null
  void* dw_partial;   // [chunks, N] accumulation type (intermediate pass), or null
  void* db_partial;
  void* dw;  // [N] param dtype (final pass), or null
  void* db;
  int64_t rows;
  int64_t N;
  int64_t rows_per_chunk;
  int64_t tiles;
};

// Kernel entry points of one (kind, dtypes, weight mode, bias) configuration, as host stubs for
// cudaLaunchKernel. reg[i] takes 2^i packs per thread; null where not instantiated.
struct FwdKernelSet {
  const void* reg[kPackSlots];
  const void* sweep;
};
struct BwdKernelSet {
  const void* reg[kPackSlots];
  const void* sweep;
};

// The address cudaLaunchKernel takes for a __global__ function (its host stub).
template <typename F>
inline const void* kernel_entry(F* kernel) {
  return reinterpret_cast<const void*>(kernel);
}

// One function per (kind, dtype combo), each defined by one inst/*.cu file. Combos: f32, f64,
// f16, bf16 (params in the input dtype), f16_f32 / bf16_f32 (fp32 params).
#define LNEXT_CUDA_COMBOS(X) \
  X(f32)                     \
  X(f64)                     \
  X(f16)                     \
  X(bf16)                    \
  X(f16_f32)                 \
  X(bf16_f32)

#define LNEXT_DECLARE_SETS(c)                                   \
  FwdKernelSet fwd_kernels_ln_##c(WMode wmode, bool has_bias);  \
  FwdKernelSet fwd_kernels_rms_##c(WMode wmode, bool has_bias); \
  BwdKernelSet bwd_kernels_ln_##c(WMode wmode);                 \
  BwdKernelSet bwd_kernels_rms_##c(WMode wmode);
LNEXT_CUDA_COMBOS(LNEXT_DECLARE_SETS)
#undef LNEXT_DECLARE_SETS

// Column kernels (inst/param_grad.cu). x_dtype: 0 f32, 1 f64, 2 f16, 3 bf16; combo as FwdProblem.
const void* param_grad_partial_kernel(Kind kind, int x_dtype);
const void* column_sum_kernel(int combo);

}  // namespace layernorm_ext::cuda
