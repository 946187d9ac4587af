// The interface between the torch-facing CPU glue (norm_cpu.cpp) and the row kernels
// (norm_krnl.cpp), which are compiled once per instruction set.
//
// It is plain C++ on purpose: the per-ISA translation units include no torch header, so no inline
// function of torch or c10 can be instantiated with AVX-512 code and then picked by the linker for
// a caller on an older CPU (the ODR trap ATen avoids with `inline namespace CPU_CAPABILITY`).
#pragma once

#include <cstdint>

namespace layernorm_ext::cpu {

// Supported (input, parameter) storage combinations. Outputs take the input's dtype, gradients
// of the parameters take the parameters' dtype, statistics the accumulation type (fp64 for fp64
// input, fp32 otherwise).
enum class DTypeCombo : int {
  kFloat = 0,      // x fp32, params fp32
  kDouble,         // x fp64, params fp64
  kHalf,           // x fp16, params fp16
  kBFloat16,       // x bf16, params bf16
  kHalfFloat,      // x fp16, params fp32 (mixed)
  kBFloat16Float,  // x bf16, params fp32 (mixed)
  kCount
};

// Which normalisation a row kernel computes.
enum class NormKind : int {
  kLayerNorm = 0,  // y = (x - mean) * rstd * w + b, rstd = 1/sqrt(var + eps)
  kRMSNorm,        // y = x * rstd * w,              rstd = 1/sqrt(mean(x^2) + eps)
  kCount
};

// Forward over rows [begin, end). Strides are in elements; rows are `N` contiguous elements.
struct FwdParams {
  const void* x = nullptr;  // [M, N] with row stride x_stride
  int64_t x_stride = 0;
  const void* weight = nullptr;  // [N] or null
  const void* bias = nullptr;    // [N] or null (LayerNorm only)
  void* y = nullptr;             // [M, N] with row stride y_stride
  int64_t y_stride = 0;
  void* mean = nullptr;  // [M] accumulation type, or null (not saved)
  void* rstd = nullptr;  // [M] accumulation type, or null (not saved)
  // Fused residual add (or null): the kernel first writes residual_out = x + residual (rounded
  // to the storage dtype) and normalises that. Same dtype as x.
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  void* residual_out = nullptr;
  int64_t residual_out_stride = 0;
  int64_t N = 0;
  double eps = 0.0;
  // Gemma-style weight: y = xhat * (1 + w). Folded in fp32, per element, never into the weight.
  bool zero_centered_weight = false;
  // Write y with non-temporal stores (outputs far larger than the last-level cache). The caller
  // guarantees y and every row start y + r * y_stride are 64-byte aligned.
  bool stream_y = false;
  // Software-prefetch the next rows of x (and residual) while applying the current ones: set for
  // inputs larger than twice the L2. Short rows are read from memory only in their first pass;
  // without it memory sits idle during the two passes that run from L1.
  bool prefetch_x = false;
  // The same for long rows (more than kShortRowVectors vectors), whose statistics pass streams
  // far enough ahead for the hardware prefetcher on some CPUs and not on others (norm_cpu.cpp).
  bool prefetch_long_rows = false;
};

// Backward over rows [begin, end): dx for each row, and the per-column partial sums of
// dy * xhat (for dweight) and dy (for dbias) added into caller-owned accumulators.
struct BwdParams {
  const void* dy = nullptr;  // [M, N] with row stride dy_stride
  int64_t dy_stride = 0;
  const void* x = nullptr;  // [M, N] with row stride x_stride
  int64_t x_stride = 0;
  const void* mean = nullptr;    // [M] accumulation type (LayerNorm only)
  const void* rstd = nullptr;    // [M] accumulation type
  const void* weight = nullptr;  // [N] or null
  void* dx = nullptr;            // [M, N] with row stride dx_stride, or null (not requested)
  int64_t dx_stride = 0;
  // Gradient of residual_out of a fused residual add (or null), added into dx.
  const void* grad_residual = nullptr;
  int64_t grad_residual_stride = 0;
  int64_t N = 0;
  bool zero_centered_weight = false;
  // Short rows one at a time rather than four interleaved: set for inputs that come from
  // beyond the cores' L2 (see norm_cpu.cpp). Results do not depend on it.
  bool short_rows_one_by_one = false;
};

using FwdRowsFn = void (*)(const FwdParams& p, int64_t begin, int64_t end);
// dw_acc / db_acc: [N] accumulators in the accumulation type, or null when not requested.
using BwdRowsFn = void (*)(const BwdParams& p, int64_t begin, int64_t end, void* dw_acc,
                           void* db_acc);
// Sums `count` partial rows of `partials` ([count, ld] accumulation type) over columns
// [col_begin, col_end) in a fixed pairwise order (partials is used as scratch) and writes the
// result to `out` ([N] in the parameter dtype).
using ColumnSumFn = void (*)(void* partials, int64_t count, int64_t ld, int64_t col_begin,
                             int64_t col_end, void* out);

struct KernelTable {
  const char* name;
  FwdRowsFn fwd[static_cast<int>(NormKind::kCount)][static_cast<int>(DTypeCombo::kCount)];
  BwdRowsFn bwd[static_cast<int>(NormKind::kCount)][static_cast<int>(DTypeCombo::kCount)];
  ColumnSumFn column_sum[static_cast<int>(DTypeCombo::kCount)];
};

// One table per compiled instruction set, each defined by one object built from norm_krnl.cpp.
// The wider ones exist only on x86-64 builds.
const KernelTable& kernel_table_scalar();
#if defined(__x86_64__) || defined(_M_X64)
#define LNEXT_CPU_HAS_X86_ISAS 1
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_avx512();
const KernelTable& kernel_table_avx512_bf16();
#endif

}  // namespace layernorm_ext::cpu
