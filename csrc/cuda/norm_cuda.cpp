// CUDA launchers: tier choice, access width, grid sizing and workspace for the kernels of
// inst/*.cu, and the CUDA registration of every op. Host code only (compiled by the host
// compiler): kernels are launched through cudaLaunchKernel from the entry points that the
// torch-free instantiation units hand out (kernel_api.h).
//
// Host-side hygiene (kernels.md §3.5), in every launcher:
//  * device guard on the input's device (checks.cpp already verified that every tensor is there),
//    and the current stream of that device;
//  * no host synchronisation, no cudaMalloc (workspace comes from the caching allocator), nothing
//    launched for empty problems: the ops can be captured in a CUDA graph;
//  * C10_CUDA_KERNEL_LAUNCH_CHECK after every launch;
//  * SM count, shared-memory limits and per-kernel occupancy are queried once per device and
//    cached.

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "../norm_host.h"
#include "kernel_api.h"

namespace layernorm_ext {
namespace {

using cuda::Kind;
using cuda::WMode;

// Grid of the forward kernels: resident blocks times this many waves, each block looping over
// rows (a persistent-style grid-stride loop; any M, no 65535 limit).
constexpr int64_t kWaves = 2;
// Parameter gradients: each persistent block of the register tier owns at least this many rows,
// so that the partial buffer (blocks x N fp32 values, written and read once, mostly in L2) stays
// small next to the rows themselves.
constexpr int64_t kMinRowsPerBlock = 4;
// Sweep tier: each row chunk of the column-parallel partial sums has at least this many rows.
constexpr int64_t kMinRowsPerChunk = 32;
// Register tier, block per row: packs per thread are chosen for about this many threads per row
// (tier 2 of plan_rows). Fewer threads with more packs each keep more bytes in flight per
// thread; measured on an H200 (2026-11-28, one session, 128 -> 64 for the forward): fp32
// 32768 x 768 116.9 -> 80.2 us (1 pack x 192 threads -> 2 x 96), 32768 x 1024 103.0 -> 82.6 us,
// bf16 32768 x 2048 136.4 -> 124.6 us (cells above 20 us whose plan is the same moved by <= 7%).
// The backward holds more per value (xhat, g, parameter-gradient sums) and measured slower with 64
// (fp32 32768 x 1024 134.0 -> 154.8 us, 32768 x 768 99.5 -> 111.0, bf16 32768 x 1024
// 87.9 -> 107.3): it keeps 128.
constexpr int64_t kFwdRowThreads = 64;
constexpr int64_t kBwdRowThreads = 128;
// Dynamic shared memory a block may use without opting in.
constexpr size_t kDefaultSmemLimit = 48 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int ilog2(int64_t v) {
  int l = 0;
  while ((int64_t{1} << (l + 1)) <= v) ++l;
  return l;
}
int64_t pow2_ceil(int64_t v) { return v <= 1 ? 1 : int64_t{1} << (ilog2(v - 1) + 1); }
int64_t pow2_floor(int64_t v) { return v <= 1 ? 1 : int64_t{1} << ilog2(v); }

// --- per-device caches --------------------------------------------------------------------------

struct DeviceInfo {
  int sms;
  int smem_optin;  // most shared memory one block may have (static + dynamic), after opting in
  int warp;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DeviceInfo>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1);
  if (!cache[device]) {
    DeviceInfo d{};
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.warp, cudaDevAttrWarpSize, device));
    // The kernels are compiled for C10_WARP_SIZE-wide warps (shuffle masks, group layout).
    TORCH_CHECK(d.warp == C10_WARP_SIZE, "layernorm_ext: CUDA device ", device, " has warp size ",
                d.warp, ", but the kernels were built for ", C10_WARP_SIZE);
    cache[device] = std::make_unique<DeviceInfo>(d);
  }
  return *cache[device];
}

struct KernelKey {
  int device;
  const void* kernel;
  int threads;
  size_t smem;
  bool operator==(const KernelKey& o) const {
    return device == o.device && kernel == o.kernel && threads == o.threads && smem == o.smem;
  }
};
struct KernelKeyHash {
  size_t operator()(const KernelKey& k) const {
    size_t h = std::hash<const void*>()(k.kernel);
    h = h * 31 + std::hash<int>()(k.device);
    h = h * 31 + std::hash<int>()(k.threads);
    return h * 31 + std::hash<size_t>()(k.smem);
  }
};

// Largest dynamic shared memory `kernel` can be launched with on `device` (the opt-in limit
// minus its static shared memory), raising the kernel's limit to it the first time (> 48 KB
// needs cudaFuncSetAttribute). Must run with `device` current.
size_t max_dynamic_smem(int device, const void* kernel) {
  static std::mutex mutex;
  static std::unordered_map<KernelKey, size_t, KernelKeyHash> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const KernelKey key{device, kernel, 0, 0};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int64_t limit = static_cast<int64_t>(device_info(device).smem_optin) -
                        static_cast<int64_t>(attr.sharedSizeBytes);
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(limit, 0));
  if (bytes > kDefaultSmemLimit) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
  cache.emplace(key, bytes);
  return bytes;
}

// Resident blocks per SM of `kernel` at this block size and dynamic shared memory (>= 1).
int blocks_per_sm(int device, const void* kernel, int threads, size_t smem) {
  if (smem > kDefaultSmemLimit) {
    TORCH_INTERNAL_ASSERT(smem <= max_dynamic_smem(device, kernel));
  }
  static std::mutex mutex;
  static std::unordered_map<KernelKey, int, KernelKeyHash> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const KernelKey key{device, kernel, threads, smem};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  TORCH_INTERNAL_ASSERT(blocks > 0, "layernorm_ext: a kernel cannot run with ", threads,
                        " threads and ", smem, " bytes of shared memory on device ", device);
  cache.emplace(key, blocks);
  return blocks;
}

void launch(const void* kernel, int64_t grid, int threads, size_t smem, cudaStream_t stream,
            void* params) {
  TORCH_INTERNAL_ASSERT(kernel != nullptr, "layernorm_ext: missing CUDA kernel instantiation");
  TORCH_INTERNAL_ASSERT(grid >= 1 && grid <= INT32_MAX);
  void* args[] = {params};
  C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(static_cast<unsigned>(grid)),
                                  dim3(static_cast<unsigned>(threads)), args, smem, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// --- layout decisions ---------------------------------------------------------------------------

struct Operand {
  const void* ptr;  // null: absent, imposes nothing
  int64_t elem_size;
};

// Elements per memory access: the pack (16 bytes of input) when every base pointer is 16-byte
// aligned and N and every row stride divide by the pack, else the widest power of two that
// divides N and the strides and keeps every access aligned, down to 1. The kernels' element ->
// thread mapping and arithmetic do not depend on it (vec_io.cuh), only the instructions do.
int access_width(int pack, int64_t N, std::initializer_list<int64_t> strides,
                 std::initializer_list<Operand> operands) {
  for (int w = pack; w > 1; w /= 2) {
    bool ok = N % w == 0;
    for (const int64_t s : strides) ok = ok && s % w == 0;
    for (const Operand& op : operands) {
      if (op.ptr != nullptr) {
        const auto align = static_cast<uintptr_t>(std::min<int64_t>(16, w * op.elem_size));
        ok = ok && reinterpret_cast<uintptr_t>(op.ptr) % align == 0;
      }
    }
    if (ok) return w;
  }
  return 1;
}

// Tier and shape of the row kernels, from N, the pack and the register budget only (never from
// M, so that a row's result does not depend on the batch).
struct Plan {
  bool sweep;
  int log2_packs;      // register tier: 2^log2_packs packs per thread
  int log2_group;      // register tier: threads per row = 2^log2_group, or -1: block per row
  int threads;         // block size
  int rows_per_block;  // rows processed at once by a block
};

Plan plan_rows(int64_t N, int pack, int max_packs, int group_block_threads, int warp,
               int64_t row_threads) {
  const int64_t packs = ceil_div(N, pack);
  Plan plan{};
  // Tier 1: a warp or sub-warp group per row, row in registers.
  if (N <= 1024 && packs <= static_cast<int64_t>(warp) * max_packs) {
    int64_t group = warp;
    int64_t per_thread = 1;
    if (packs <= warp) {
      group = pow2_ceil(packs);
    } else {
      per_thread = pow2_ceil(ceil_div(packs, warp));
    }
    plan.log2_packs = ilog2(per_thread);
    plan.log2_group = ilog2(group);
    plan.threads = group_block_threads;
    plan.rows_per_block = static_cast<int>(group_block_threads / group);
    return plan;
  }
  // Tier 2: a block per row, row in registers; about row_threads threads' worth of packs per
  // pass, more packs per thread before more threads.
  if (packs <= static_cast<int64_t>(cuda::kRegMaxThreads) * max_packs) {
    int64_t per_thread =
        std::min<int64_t>(max_packs, pow2_floor(std::max<int64_t>(packs / row_threads, 1)));
    while (ceil_div(packs, per_thread) > cuda::kRegMaxThreads) per_thread *= 2;
    plan.log2_packs = ilog2(per_thread);
    plan.log2_group = -1;
    plan.threads = static_cast<int>(ceil_div(ceil_div(packs, per_thread), warp) * warp);
    plan.rows_per_block = 1;
    return plan;
  }
  // Tier 3: block per row, statistics sweep then apply sweep.
  plan.sweep = true;
  plan.log2_group = -1;
  plan.threads = cuda::kSweepThreads;
  plan.rows_per_block = 1;
  return plan;
}

WMode weight_mode(const at::Tensor& weight, bool zero_centered) {
  if (!weight.defined()) return WMode::kNone;
  return zero_centered ? WMode::kPlusOne : WMode::kPlain;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr() : nullptr;
}

// 0 f32, 1 f64, 2 f16, 3 bf16 for the input of a dtype combo (FwdProblem::combo).
int input_dtype_of(int combo) { return combo < 4 ? combo : combo - 2; }

cuda::FwdKernelSet fwd_kernels(Norm kind, int combo, WMode wmode, bool has_bias) {
  const bool ln = kind == Norm::kLayerNorm;
  switch (combo) {
#define LNEXT_FWD_CASE(index, c)                          \
  case index:                                             \
    return ln ? cuda::fwd_kernels_ln_##c(wmode, has_bias) \
              : cuda::fwd_kernels_rms_##c(wmode, has_bias);
    LNEXT_FWD_CASE(0, f32)
    LNEXT_FWD_CASE(1, f64)
    LNEXT_FWD_CASE(2, f16)
    LNEXT_FWD_CASE(3, bf16)
    LNEXT_FWD_CASE(4, f16_f32)
    LNEXT_FWD_CASE(5, bf16_f32)
#undef LNEXT_FWD_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "layernorm_ext: unknown dtype combination ", combo);
  }
}

cuda::BwdKernelSet bwd_kernels(Norm kind, int combo, WMode wmode) {
  // Without a weight dx does not involve the parameter dtype: mixed combos use the unmixed set.
  if (wmode == WMode::kNone && combo >= 4) combo -= 2;
  const bool ln = kind == Norm::kLayerNorm;
  switch (combo) {
#define LNEXT_BWD_CASE(index, c) \
  case index:                    \
    return ln ? cuda::bwd_kernels_ln_##c(wmode) : cuda::bwd_kernels_rms_##c(wmode);
    LNEXT_BWD_CASE(0, f32)
    LNEXT_BWD_CASE(1, f64)
    LNEXT_BWD_CASE(2, f16)
    LNEXT_BWD_CASE(3, bf16)
    LNEXT_BWD_CASE(4, f16_f32)
    LNEXT_BWD_CASE(5, bf16_f32)
#undef LNEXT_BWD_CASE
    default:
      TORCH_INTERNAL_ASSERT(false, "layernorm_ext: unknown dtype combination ", combo);
  }
}

// --- forward ------------------------------------------------------------------------------------

void launch_forward_cuda(const FwdProblem& p) {
  if (p.M == 0 || p.N == 0) {
    return;  // prepare_forward already gave empty rows their statistics (mean 0, rstd 1/sqrt(eps))
  }
  const c10::cuda::OptionalCUDAGuard guard(p.x.device());
  const int device = p.x.get_device();
  const DeviceInfo& dev = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  cuda::FwdParams k{};
  k.x = p.x.const_data_ptr();
  k.weight = ptr_or_null(p.weight);
  k.bias = ptr_or_null(p.bias);
  k.y = p.y.mutable_data_ptr();
  k.mean = mutable_ptr_or_null(p.mean);
  k.rstd = mutable_ptr_or_null(p.rstd);
  k.M = p.M;
  k.N = p.N;
  k.x_stride = p.x_stride;
  k.y_stride = p.y_stride;
  if (p.residual.defined()) {
    // Fused residual add (kernel comments in fwd_kernels.cuh); residual_out may be residual.
    k.residual = p.residual.const_data_ptr();
    k.residual_stride = p.residual_stride;
    k.residual_out = p.residual_out.mutable_data_ptr();
    k.residual_out_stride = p.residual_out_stride;
  }
  k.eps = p.eps;

  const int64_t xs = p.x.element_size();
  const int64_t ps = p.weight.defined() ? p.weight.element_size()
                     : p.bias.defined() ? p.bias.element_size()
                                        : xs;
  const int pack = cuda::pack_elems(static_cast<int>(xs));
  k.width = access_width(
      pack, p.N, {p.x_stride, p.y_stride, k.residual_stride, k.residual_out_stride},
      {{k.x, xs}, {k.y, xs}, {k.weight, ps}, {k.bias, ps}, {k.residual, xs}, {k.residual_out, xs}});
  const cuda::FwdKernelSet set =
      fwd_kernels(p.kind, p.combo, weight_mode(p.weight, p.zero_centered_weight), p.bias.defined());
  const Plan plan = plan_rows(p.N, pack, cuda::fwd_max_packs(static_cast<int>(xs)),
                              cuda::kFwdGroupThreads, dev.warp, kFwdRowThreads);
  k.log2_group = plan.log2_group;

  if (!plan.sweep) {
    const void* kernel = set.reg[plan.log2_packs];
    const int occupancy = blocks_per_sm(device, kernel, plan.threads, 0);
    const int64_t grid = std::min(ceil_div(p.M, plan.rows_per_block),
                                  static_cast<int64_t>(dev.sms) * occupancy * kWaves);
    launch(kernel, grid, plan.threads, 0, stream, &k);
    return;
  }
  // Keep the row in shared memory between the sweeps when it fits: HBM is then read once.
  const void* kernel = set.sweep;
  const int64_t cache_bytes = ceil_div(p.N, pack) * 16;
  k.cache = cache_bytes <= static_cast<int64_t>(max_dynamic_smem(device, kernel)) ? 1 : 0;
  const size_t smem = k.cache ? static_cast<size_t>(cache_bytes) : 0;
  const int occupancy = blocks_per_sm(device, kernel, plan.threads, smem);
  const int64_t grid = std::min(p.M, static_cast<int64_t>(dev.sms) * occupancy * kWaves);
  launch(kernel, grid, plan.threads, smem, stream, &k);
}

// --- backward -----------------------------------------------------------------------------------

// Second stage of the parameter gradients: partial rows [rows, N] (accumulation type) -> dw / db
// in the param dtype, in passes of at most kColumnSumRows rows per block (intermediate passes
// write [chunks, N] partial rows to a fresh workspace), each pass in a fixed order.
void launch_column_sum(const BwdProblem& p, const DeviceInfo& dev, cudaStream_t stream,
                       const void* dw_partial, const void* db_partial, int64_t rows) {
  const void* kernel = cuda::column_sum_kernel(p.combo);
  const int64_t tiles = ceil_div(p.N, dev.warp);
  const auto acc_options = p.x.options().dtype(acc_type(p.x.scalar_type()));
  const int64_t acc_size = acc_options.dtype().itemsize();
  // Holds the workspace the current pass reads: it is released only after the pass that reads it
  // has been enqueued (the caching allocator may then hand it out for later work on this stream).
  at::Tensor input_holder;
  while (true) {
    cuda::ColumnSumParams c{};
    c.dw_in = dw_partial;
    c.db_in = db_partial;
    c.rows = rows;
    c.N = p.N;
    c.tiles = tiles;
    c.rows_per_chunk = cuda::kColumnSumRows;
    const int64_t chunks = ceil_div(rows, cuda::kColumnSumRows);
    at::Tensor next;
    if (chunks == 1) {
      c.dw = mutable_ptr_or_null(p.dweight);
      c.db = mutable_ptr_or_null(p.dbias);
    } else {
      const int64_t quantities = (dw_partial != nullptr ? 1 : 0) + (db_partial != nullptr ? 1 : 0);
      next = at::empty({quantities, chunks, p.N}, acc_options);
      char* base = static_cast<char*>(next.mutable_data_ptr());
      c.dw_partial = dw_partial != nullptr ? base : nullptr;
      c.db_partial = db_partial != nullptr
                         ? base + (dw_partial != nullptr ? chunks * p.N * acc_size : 0)
                         : nullptr;
    }
    launch(kernel, tiles * chunks, cuda::kColThreads, 0, stream, &c);
    if (chunks == 1) {
      return;
    }
    input_holder = std::move(next);
    dw_partial = c.dw_partial;
    db_partial = c.db_partial;
    rows = chunks;
  }
}

void launch_backward_cuda(const BwdProblem& p) {
  if (p.M == 0 || p.N == 0) {
    return;  // with M == 0, prepare_backward created dweight / dbias as zeros
  }
  const bool need_dx = p.dx.defined();
  const bool need_dw = p.dweight.defined();
  const bool need_db = p.dbias.defined();
  if (!need_dx && !need_dw && !need_db) {
    return;
  }
  const c10::cuda::OptionalCUDAGuard guard(p.x.device());
  const int device = p.x.get_device();
  const DeviceInfo& dev = device_info(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();

  cuda::BwdParams k{};
  k.dy = p.dy.const_data_ptr();
  k.x = p.x.const_data_ptr();
  k.mean = ptr_or_null(p.mean);
  k.rstd = p.rstd.const_data_ptr();
  k.weight = ptr_or_null(p.weight);
  k.dx = mutable_ptr_or_null(p.dx);
  k.M = p.M;
  k.N = p.N;
  k.dy_stride = p.dy_stride;
  k.x_stride = p.x_stride;
  if (need_dx && p.grad_residual.defined()) {
    // Fused residual add: dx += grad_residual inside the dx kernels.
    k.grad_residual = p.grad_residual.const_data_ptr();
    k.grad_residual_stride = p.grad_residual_stride;
  }

  const int64_t xs = p.x.element_size();
  const int64_t ps = p.weight.defined() ? p.weight.element_size() : xs;
  const int pack = cuda::pack_elems(static_cast<int>(xs));
  k.width =
      access_width(pack, p.N, {p.dy_stride, p.x_stride, k.grad_residual_stride},
                   {{k.dy, xs}, {k.x, xs}, {k.dx, xs}, {k.weight, ps}, {k.grad_residual, xs}});
  const WMode wmode = weight_mode(p.weight, p.zero_centered_weight);
  const cuda::BwdKernelSet set = bwd_kernels(p.kind, p.combo, wmode);
  const Plan plan = plan_rows(p.N, pack, cuda::bwd_max_packs(static_cast<int>(xs)),
                              cuda::kBwdGroupThreads, dev.warp, kBwdRowThreads);
  k.log2_group = plan.log2_group;
  const auto acc_options = p.x.options().dtype(acc_type(p.x.scalar_type()));
  const int64_t acc_size = xs == 8 ? 8 : 4;
  const bool need_params = need_dw || need_db;
  const int64_t quantities = (need_dw ? 1 : 0) + (need_db ? 1 : 0);

  if (!plan.sweep) {
    // Persistent blocks, each owning a fixed range of rows; with parameter gradients each also
    // writes one row of the partial buffers (kernel comment in bwd_kernels.cuh).
    const void* kernel = set.reg[plan.log2_packs];
    const size_t smem =
        need_params && plan.log2_group >= 0
            ? static_cast<size_t>(plan.threads) * (size_t{1} << plan.log2_packs) * pack * acc_size
            : 0;
    const int occupancy = blocks_per_sm(device, kernel, plan.threads, smem);
    int64_t blocks =
        std::min(ceil_div(p.M, plan.rows_per_block), static_cast<int64_t>(dev.sms) * occupancy);
    if (need_params) {
      blocks =
          std::min(blocks, ceil_div(p.M, std::max<int64_t>(kMinRowsPerBlock, plan.rows_per_block)));
    }
    k.rows_per_block = ceil_div(p.M, blocks);
    blocks = ceil_div(p.M, k.rows_per_block);
    at::Tensor partial;
    if (need_params) {
      // Every slot is written by the kernel: no memset.
      partial = at::empty({quantities, blocks, p.N}, acc_options);
      char* base = static_cast<char*>(partial.mutable_data_ptr());
      const int64_t bytes = blocks * p.N * acc_size;
      k.dw_partial = need_dw ? base : nullptr;
      k.db_partial = need_db ? base + (need_dw ? bytes : 0) : nullptr;
    }
    launch(kernel, blocks, plan.threads, smem, stream, &k);
    if (need_params) {
      launch_column_sum(p, dev, stream, k.dw_partial, k.db_partial, blocks);
    }
    return;
  }

  if (need_dx) {
    const void* kernel = set.sweep;
    const int64_t cache_bytes = 2 * ceil_div(p.N, pack) * 16;  // x and dy
    k.cache = cache_bytes <= static_cast<int64_t>(max_dynamic_smem(device, kernel)) ? 1 : 0;
    const size_t smem = k.cache ? static_cast<size_t>(cache_bytes) : 0;
    const int occupancy = blocks_per_sm(device, kernel, plan.threads, smem);
    const int64_t grid = std::min(p.M, static_cast<int64_t>(dev.sms) * occupancy * kWaves);
    launch(kernel, grid, plan.threads, smem, stream, &k);
  }
  if (need_params) {
    // Column-parallel partial sums over fixed row chunks: about one wave of blocks.
    cuda::ParamGradParams g{};
    g.dy = k.dy;
    g.x = k.x;
    g.mean = k.mean;
    g.rstd = k.rstd;
    g.M = p.M;
    g.N = p.N;
    g.dy_stride = p.dy_stride;
    g.x_stride = p.x_stride;
    g.tiles = ceil_div(p.N, dev.warp);
    const void* kernel = cuda::param_grad_partial_kernel(
        p.kind == Norm::kLayerNorm ? Kind::kLayerNorm : Kind::kRMSNorm, input_dtype_of(p.combo));
    const int occupancy = blocks_per_sm(device, kernel, cuda::kColThreads, 0);
    const int64_t target = static_cast<int64_t>(dev.sms) * occupancy;
    int64_t chunks =
        std::max<int64_t>(1, std::min(ceil_div(target, g.tiles), ceil_div(p.M, kMinRowsPerChunk)));
    g.rows_per_chunk = ceil_div(p.M, chunks);
    chunks = ceil_div(p.M, g.rows_per_chunk);
    at::Tensor partial = at::empty({quantities, chunks, p.N}, acc_options);
    char* base = static_cast<char*>(partial.mutable_data_ptr());
    const int64_t bytes = chunks * p.N * acc_size;
    g.dw_partial = need_dw ? base : nullptr;
    g.db_partial = need_db ? base + (need_dw ? bytes : 0) : nullptr;
    launch(kernel, g.tiles * chunks, cuda::kColThreads, 0, stream, &g);
    launch_column_sum(p, dev, stream, g.dw_partial, g.db_partial, chunks);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CUDA, m) {
  m.impl("layer_norm", TORCH_FN(layer_norm_impl<launch_forward_cuda>));
  m.impl("layer_norm.out", TORCH_FN(layer_norm_out_impl<launch_forward_cuda>));
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_impl<launch_forward_cuda>));
  m.impl("layer_norm_bwd", TORCH_FN((layer_norm_bwd_impl<launch_backward_cuda, true>)));
  m.impl("rms_norm", TORCH_FN(rms_norm_impl<launch_forward_cuda>));
  m.impl("rms_norm.out", TORCH_FN(rms_norm_out_impl<launch_forward_cuda>));
  m.impl("rms_norm_fwd", TORCH_FN(rms_norm_fwd_impl<launch_forward_cuda>));
  m.impl("rms_norm_bwd", TORCH_FN((rms_norm_bwd_impl<launch_backward_cuda, true>)));
  // Fused residual add, in the kernels (kFusedAdd = true): one pass over memory. The forward
  // kernels write residual_out = input + residual and normalise it; the dx kernels add the
  // residual gradient before rounding dx.
  m.impl("add_layer_norm", TORCH_FN((add_layer_norm_impl<launch_forward_cuda, true>)));
  m.impl("add_layer_norm_fwd", TORCH_FN((add_layer_norm_fwd_impl<launch_forward_cuda, true>)));
  m.impl("add_layer_norm_inplace",
         TORCH_FN((add_layer_norm_inplace_impl<launch_forward_cuda, true>)));
  m.impl("add_rms_norm", TORCH_FN((add_rms_norm_impl<launch_forward_cuda, true>)));
  m.impl("add_rms_norm_fwd", TORCH_FN((add_rms_norm_fwd_impl<launch_forward_cuda, true>)));
  m.impl("add_rms_norm_inplace", TORCH_FN((add_rms_norm_inplace_impl<launch_forward_cuda, true>)));
}

}  // namespace layernorm_ext
