// CPU launchers: split rows across torch's intra-op thread pool and call the ISA-specific row
// kernels (norm_krnl.cpp) chosen by isa.cpp. Registers the CPU kernels of every op.

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__linux__)
#include <fcntl.h>
#include <unistd.h>
#endif

#include "../norm_host.h"
#include "isa.h"
#include "kernel_api.h"
#include "pages.h"
#include "stream_policy.h"

namespace layernorm_ext {
namespace {

// Elements per task of the backward's parameter-gradient passes (chunk count, column split).
// Only splits change with the thread count; a row's arithmetic never does, so results are
// bitwise identical for any number of threads.
constexpr int64_t kGrainElements = 16384;

// Rows per task: at least ~14K element-equivalents, a row costing N + kRowOverhead (its
// horizontal sums, statistics and tail are a fixed cost, ~60 cycles: as much as ~100 elements
// at N = 50). Below that, waking the second thread costs more than it saves. Measured (out=,
// 1 vs 2 threads, with this cost model): fp32 8 x 1024 (2.19 vs 2.20 us) and bf16 8 x 768 stay
// on one thread; fp32 4 x 4096 3.76 -> 3.24 us, bf16 256 x 50 7.96 -> 5.56 us and bf16
// 128 x 128 5.08 -> 3.95 us split (a grain of 16384 elements kept them whole).
constexpr int64_t kGrainWork = 14336;
constexpr int64_t kRowOverhead = 64;

int64_t row_grain(int64_t N) {
  return std::max<int64_t>(1, kGrainWork / (std::max<int64_t>(N, 0) + kRowOverhead));
}

// Cache sizes one core can use, from Linux sysfs (e.g. "32768K"); 0 when unknown.
// (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reports 320 MiB in this project's 2-vCPU VM, whose
// core sits on a 32 MiB L3 slice: it counts the whole socket.)
struct CacheSizes {
  int64_t l2 = 0;          // the level-2 cache
  int64_t last_level = 0;  // the largest cache of level >= 2
};

// The first number in a small text file, scaled by a K / M / G suffix; 0 if unreadable.
// Plain POSIX reads, not iostreams. The lent GPU machine's first CPU call (which reads these
// files) crashed inside std::codecvt::do_unshift, called virtually: most likely a libstdc++
// linked statically into this library (that machine's g++ is a wrapper; not confirmed) whose
// exported streams ran on the process's other libstdc++'s locale data. Reproduced here with
// -static-libstdc++: std::ifstream read nothing. The builds now keep such a copy private
// (--exclude-libs); these reads no longer depend on it either way.
int64_t read_scaled_number(const char* path) {
#if defined(__linux__)
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return 0;
  }
  char text[64] = {};
  const ssize_t got = ::read(fd, text, sizeof(text) - 1);
  ::close(fd);
  int64_t value = 0;
  ssize_t i = 0;
  for (; i < got && text[i] >= '0' && text[i] <= '9' && value < (int64_t{1} << 40); ++i) {
    value = value * 10 + (text[i] - '0');
  }
  if (i < got) {
    const char unit = text[i];
    value <<= unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
  }
  return value;
#else
  (void)path;
  return 0;
#endif
}

CacheSizes read_cache_sizes() {
  CacheSizes c;
  for (int index = 0; index < 8; ++index) {
    char path[96];
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
    const int64_t level = read_scaled_number(path);
    std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
    const int64_t size = read_scaled_number(path);
    if (level == 0 || size == 0) {
      continue;
    }
    if (level == 2) c.l2 = std::max(c.l2, size);
    if (level >= 2) c.last_level = std::max(c.last_level, size);
  }
  return c;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

// Non-temporal stores once the input and the output together fill the last-level cache (32 MiB
// if unknown, or if smaller; or what cpu::set_stream_min_bytes set): they cannot both stay in it,
// and streaming skips the read-for-ownership of every destination line (a third of the memory
// traffic of a normalisation). Smaller problems leave the output in cache for its reader.
// Measured (out=, median of 5 rounds against copy_ of the same bytes, two runs): with the output
// alone as the criterion, 24 MiB fp16 16384 x 768 and 16 MiB fp32 2048 x 2048 outputs (plain
// stores) ran at 0.53-0.56 / 0.37-0.43 of copy_'s bandwidth; streamed, 0.60-0.84 / 0.66-0.78.
int64_t default_streaming_threshold_bytes() {
  static const int64_t bytes = std::max<int64_t>(cache_sizes().last_level, int64_t{32} << 20);
  return bytes;
}

int64_t streaming_threshold_bytes() {
  const int64_t set = cpu::stream_min_bytes_setting();
  return set > 0 ? set : default_streaming_threshold_bytes();
}

// Under the default policy (on CPUs where streaming pays, stream_policy.cpp), a fresh mapping
// takes plain stores: there they measured ~10% faster than streaming (the page faults dominate;
// e.g. fp32 2048 x 8192 fresh outputs 29.3 vs 37.6 ms). A reused allocation streams like the
// caller's buffers (bf16 16384 x 768: 1.23-1.37x F.layer_norm's speed with plain stores,
// 1.96-2.41x streamed). The size test comes first, so small calls never read the policy.
bool use_streaming_stores(const FwdProblem& p) {
  const int64_t item = static_cast<int64_t>(p.y.element_size());
  const int64_t bytes = p.M * p.N * (item + static_cast<int64_t>(p.x.element_size()));
  const auto addr = reinterpret_cast<std::uintptr_t>(p.y.const_data_ptr());
  if (bytes < streaming_threshold_bytes() || addr % 64 != 0 || (p.y_stride * item) % 64 != 0) {
    return false;
  }
  switch (cpu::stream_policy()) {
    case cpu::StreamPolicy::kOff:
      return false;
    case cpu::StreamPolicy::kOn:
      return true;
    case cpu::StreamPolicy::kAuto:
      break;
  }
  return cpu::streams_by_default() &&
         (!p.y_fresh || cpu::middle_page_resident(p.y.const_data_ptr(), p.M * p.N * item));
}

int64_t l2_bytes() { return cache_sizes().l2 > 0 ? cache_sizes().l2 : int64_t{1} << 20; }

// Inputs that cannot stay in the cores' L2 across calls come from L3 or DRAM: the kernels then
// prefetch each next group of rows during the current group's apply pass. (In-cache inputs skip
// it: there it is only extra load-port work.)
bool use_prefetch(const FwdProblem& p) {
  const int64_t bytes = p.M * p.N * static_cast<int64_t>(p.x.element_size());
  return bytes > 2 * l2_bytes();
}

// Long rows (more than 64 vectors) from beyond L2 also fetch the next rows into L2 during the
// apply pass, except on AMD CPUs (an earlier note, without figures, found it slower on the
// Zen 4 VM; not re-measured). Measured on the Intel Xeon (Skylake-SP) 2-vCPU VM,
// 2 threads, out= against copy_ of the same bytes, fraction of copy_'s bandwidth without ->
// with, two or three runs: LayerNorm fp32 2048 x 4096 0.71-0.76 -> 0.79-0.82, 4096 x 2048
// 0.76-0.77 -> 0.82-0.83, 16384 x 4096 0.74-0.76 -> 0.78-0.82; bf16 4096 x 2048 0.56-0.59 ->
// 0.61-0.64, 16384 x 4096 0.58-0.62 -> 0.61-0.65; fp16 4096 x 2048 0.67 -> 0.75, 16384 x 4096
// 0.68-0.70 -> 0.71-0.73 (with one prefetch per 64-byte line: two per line had made fp16 5-8%
// slower); RMSNorm fp32 4096 x 2048 0.84 -> 0.90, bf16 16384 x 4096 0.63 -> 0.69.
bool use_long_row_prefetch() { return !cpu::is_amd(); }

// The backward's short rows go one by one (not four interleaved) once x and dy together exceed
// four times L2: measured (1 thread, N = 128 fp32) four interleaved rows were 1.5x faster with
// 2 MiB of x, and 2.4x slower with 4 MiB (norm_krnl.cpp, bwd_rows_impl).
bool short_rows_one_by_one(const BwdProblem& p) {
  const int64_t bytes = 2 * p.M * p.N * static_cast<int64_t>(p.x.element_size());
  return bytes > 4 * l2_bytes();
}

void launch_forward_cpu(const FwdProblem& p) {
  if (p.M == 0 || p.N == 0) {
    return;
  }
  cpu::FwdParams k;
  k.x = p.x.const_data_ptr();
  k.x_stride = p.x_stride;
  k.weight = p.weight.defined() ? p.weight.const_data_ptr() : nullptr;
  k.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  k.y = p.y.mutable_data_ptr();
  k.y_stride = p.y_stride;
  k.mean = p.mean.defined() ? p.mean.mutable_data_ptr() : nullptr;
  k.rstd = p.rstd.defined() ? p.rstd.mutable_data_ptr() : nullptr;
  if (p.residual.defined()) {
    k.residual = p.residual.const_data_ptr();
    k.residual_stride = p.residual_stride;
    k.residual_out = p.residual_out.mutable_data_ptr();
    k.residual_out_stride = p.residual_out_stride;
  }
  k.N = p.N;
  k.eps = p.eps;
  k.zero_centered_weight = p.zero_centered_weight;
  k.stream_y = use_streaming_stores(p);
  k.prefetch_x = use_prefetch(p);
  k.prefetch_long_rows = k.prefetch_x && use_long_row_prefetch();
  const cpu::FwdRowsFn fn = cpu::active_table().fwd[static_cast<int>(p.kind)][p.combo];
  at::parallel_for(0, p.M, row_grain(p.N), [&](int64_t begin, int64_t end) { fn(k, begin, end); });
}

// Number of row chunks for the parameter gradients. It depends only on (M, N), never on the
// thread count, so dweight / dbias are bitwise reproducible on any machine configuration:
// chunk c sums its rows in order into partial row c, and the partial rows are then added in a
// fixed pairwise tree. A chunk holds at most kMaxChunkRows rows: its in-order fp32 sum has an
// error bound growing with its length (65535 rows of N = 5 in 5 chunks gave 1e-3 relative
// error), while the pairwise tree over the chunks only adds log2(chunks) roundings. The extra
// partial rows cost 4 / kMaxChunkRows bytes per element of x.
int64_t gradient_chunks(int64_t M, int64_t N) {
  constexpr int64_t kWorkChunks = 64;
  constexpr int64_t kMaxChunkRows = 256;
  const int64_t by_work = std::max<int64_t>(1, (M * N) / (4 * kGrainElements));
  const int64_t by_length = (M + kMaxChunkRows - 1) / kMaxChunkRows;
  return std::max(std::min({kWorkChunks, by_work, M}), by_length);
}

void launch_backward_cpu(const BwdProblem& p) {
  if (p.M == 0 || p.N == 0) {
    return;  // dweight / dbias were created as zeros when M == 0
  }
  cpu::BwdParams k;
  k.dy = p.dy.const_data_ptr();
  k.dy_stride = p.dy_stride;
  k.x = p.x.const_data_ptr();
  k.x_stride = p.x_stride;
  k.mean = p.mean.defined() ? p.mean.const_data_ptr() : nullptr;
  k.rstd = p.rstd.const_data_ptr();
  k.weight = p.weight.defined() ? p.weight.const_data_ptr() : nullptr;
  k.dx = p.dx.defined() ? p.dx.mutable_data_ptr() : nullptr;
  k.dx_stride = p.N;
  if (p.grad_residual.defined()) {
    k.grad_residual = p.grad_residual.const_data_ptr();
    k.grad_residual_stride = p.grad_residual_stride;
  }
  k.N = p.N;
  k.zero_centered_weight = p.zero_centered_weight;
  k.short_rows_one_by_one = short_rows_one_by_one(p);
  const cpu::KernelTable& table = cpu::active_table();
  const cpu::BwdRowsFn fn = table.bwd[static_cast<int>(p.kind)][p.combo];

  const bool need_dw = p.dweight.defined();
  const bool need_db = p.dbias.defined();
  if (!need_dw && !need_db) {
    if (k.dx == nullptr) {
      return;
    }
    at::parallel_for(0, p.M, row_grain(p.N),
                     [&](int64_t begin, int64_t end) { fn(k, begin, end, nullptr, nullptr); });
    return;
  }

  const int64_t N = p.N;
  int64_t chunks = gradient_chunks(p.M, N);
  const int64_t rows_per_chunk = (p.M + chunks - 1) / chunks;
  chunks = (p.M + rows_per_chunk - 1) / rows_per_chunk;
  const at::ScalarType acc_dtype = acc_type(p.x.scalar_type());
  const size_t acc_size = c10::elementSize(acc_dtype);
  // Partial rows, zeroed here (a memset, not a zeros op). A single chunk of an fp32 / fp64
  // parameter accumulates straight into the gradient: no partial buffer, no column pass.
  auto partial_rows = [&](const at::Tensor& grad) -> at::Tensor {
    if (!grad.defined()) {
      return at::Tensor();
    }
    at::Tensor rows =
        chunks == 1 && grad.scalar_type() == acc_dtype && grad.is_contiguous()
            ? grad
            : at::Tensor(at::detail::empty_cpu({chunks, N}, p.x.options().dtype(acc_dtype)));
    std::memset(rows.mutable_data_ptr(), 0, static_cast<size_t>(chunks * N) * acc_size);
    return rows;
  };
  const at::Tensor dw_partial = partial_rows(p.dweight);
  const at::Tensor db_partial = partial_rows(p.dbias);
  char* dw_base = need_dw ? static_cast<char*>(dw_partial.mutable_data_ptr()) : nullptr;
  char* db_base = need_db ? static_cast<char*>(db_partial.mutable_data_ptr()) : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t begin = c * rows_per_chunk;
      const int64_t end = std::min(p.M, begin + rows_per_chunk);
      const size_t offset = static_cast<size_t>(c) * N * acc_size;
      fn(k, begin, end, need_dw ? dw_base + offset : nullptr, need_db ? db_base + offset : nullptr);
    }
  });
  const bool sum_dw = need_dw && !dw_partial.is_same(p.dweight);
  const bool sum_db = need_db && !db_partial.is_same(p.dbias);
  if (!sum_dw && !sum_db) {
    return;
  }
  const cpu::ColumnSumFn column_sum = table.column_sum[p.combo];
  const int64_t col_grain = std::max<int64_t>(64, kGrainElements / chunks);
  at::parallel_for(0, N, col_grain, [&](int64_t begin, int64_t end) {
    if (sum_dw) column_sum(dw_base, chunks, N, begin, end, p.dweight.mutable_data_ptr());
    if (sum_db) column_sum(db_base, chunks, N, begin, end, p.dbias.mutable_data_ptr());
  });
}

}  // namespace

int64_t cpu::stream_min_bytes() { return streaming_threshold_bytes(); }

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("layer_norm", TORCH_FN(layer_norm_impl<launch_forward_cpu>));
  m.impl("layer_norm.out", TORCH_FN(layer_norm_out_impl<launch_forward_cpu>));
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_impl<launch_forward_cpu>));
  m.impl("layer_norm_bwd", TORCH_FN((layer_norm_bwd_impl<launch_backward_cpu, true>)));
  m.impl("rms_norm", TORCH_FN(rms_norm_impl<launch_forward_cpu>));
  m.impl("rms_norm.out", TORCH_FN(rms_norm_out_impl<launch_forward_cpu>));
  m.impl("rms_norm_fwd", TORCH_FN(rms_norm_fwd_impl<launch_forward_cpu>));
  m.impl("rms_norm_bwd", TORCH_FN((rms_norm_bwd_impl<launch_backward_cpu, true>)));
  m.impl("add_layer_norm", TORCH_FN((add_layer_norm_impl<launch_forward_cpu, true>)));
  m.impl("add_layer_norm_fwd", TORCH_FN((add_layer_norm_fwd_impl<launch_forward_cpu, true>)));
  m.impl("add_layer_norm_inplace",
         TORCH_FN((add_layer_norm_inplace_impl<launch_forward_cpu, true>)));
  m.impl("add_rms_norm", TORCH_FN((add_rms_norm_impl<launch_forward_cpu, true>)));
  m.impl("add_rms_norm_fwd", TORCH_FN((add_rms_norm_fwd_impl<launch_forward_cpu, true>)));
  m.impl("add_rms_norm_inplace", TORCH_FN((add_rms_norm_inplace_impl<launch_forward_cpu, true>)));
}

}  // namespace layernorm_ext
