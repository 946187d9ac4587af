// Torch-free driver of the CPU row kernels, for memory and undefined-behaviour checkers
// (scripts/check_cpu_kernels.sh builds it with AddressSanitizer + UndefinedBehaviorSanitizer, or
// runs it under valgrind). It calls every kernel of every selected kernel table (forward,
// backward, column sums; LayerNorm and RMSNorm; every dtype combination) over many row lengths
// and row counts, with and without weight, bias, saved statistics, fused residual, zero-centered
// weight, prefetching and padded row strides, and tasks that start past row 0. Every buffer is
// its own heap allocation of exactly the bytes the kernels may touch, so a read or write past it
// is reported. Results are not checked here (the Python test suite does that): only that the
// kernels touch nothing else and execute no undefined behaviour.
//
//   kernel_driver [tables] [max_n] [max_long]
//     tables: comma-separated, default all; every N <= max_n (default 140), then the boundary
//     sizes above it up to max_long (default 20000)

#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernel_api.h"

namespace {

using namespace layernorm_ext::cpu;

std::mt19937 rng(1);

float draw() { return std::normal_distribution<float>(0.5f, 2.f)(rng); }

size_t input_size(int combo) { return combo == 0 ? 4 : combo == 1 ? 8 : 2; }
size_t param_size(int combo) { return combo == 0 || combo >= 4 ? 4 : combo == 1 ? 8 : 2; }
size_t acc_size(int combo) { return combo == 1 ? 8 : 4; }
bool is_bf16(int combo) { return combo == 3 || combo == 5; }

// A heap buffer of exactly `count` values of `elem` bytes (none for 0), filled with random values.
class Buffer {
 public:
  Buffer(size_t count, size_t elem, bool bf16) : p_(count ? std::malloc(count * elem) : nullptr) {
    for (size_t i = 0; i < count; ++i) {
      const float f = draw();
      if (elem == 4) {
        static_cast<float*>(p_)[i] = f;
      } else if (elem == 8) {
        static_cast<double*>(p_)[i] = f;
      } else if (bf16) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        static_cast<uint16_t*>(p_)[i] = static_cast<uint16_t>(u >> 16);
      } else {
        static_cast<uint16_t*>(p_)[i] = _cvtss_sh(f, 0);
      }
    }
  }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* get() const { return p_; }

 private:
  void* p_;
};

struct Table {
  const char* name;
  const KernelTable& (*get)();
};

const Table kTables[] = {
    {"scalar", &kernel_table_scalar},
    {"avx2", &kernel_table_avx2},
    {"avx512", &kernel_table_avx512},
    {"avx512_bf16", &kernel_table_avx512_bf16},
};

bool selected(const std::string& list, const char* name) {
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    if (list.compare(start, end - start, name) == 0) return true;
    start = end + 1;
  }
  return false;
}

// One (table, kind, combo, M, N, option set): forward, backward and column sums.
int64_t run_case(const KernelTable& t, int kind, int combo, int64_t M, int64_t N, int opt) {
  const bool has_w = opt & 1;
  const bool has_b = (opt & 2) && kind == 0;
  const bool fused = opt & 4;
  const int64_t stride = (opt & 8) ? N + 3 : N;
  const size_t es = input_size(combo);
  const size_t ps = param_size(combo);
  const size_t as = acc_size(combo);
  const bool bf = is_bf16(combo);
  const size_t rows = static_cast<size_t>((M - 1) * stride + N);  // elements a strided tensor spans
  Buffer x(rows, es, bf), y(rows, es, bf), w(has_w ? N : 0, ps, bf), b(has_b ? N : 0, ps, bf);
  Buffer mean(M, as, false), rstd(M, as, false);
  Buffer residual(fused ? rows : 0, es, bf), residual_out(fused ? rows : 0, es, bf);
  int64_t calls = 0;
  for (int variant = 0; variant < 2; ++variant) {
    FwdParams p;
    p.x = x.get();
    p.x_stride = stride;
    p.weight = w.get();
    p.bias = b.get();
    p.y = y.get();
    p.y_stride = stride;
    p.mean = kind == 0 && variant == 0 ? mean.get() : nullptr;
    p.rstd = variant == 0 ? rstd.get() : nullptr;
    p.N = N;
    p.eps = 1e-5;
    p.zero_centered_weight = variant == 1;
    p.prefetch_x = variant == 1;
    if (fused) {
      p.residual = residual.get();
      p.residual_stride = stride;
      p.residual_out = residual_out.get();
      p.residual_out_stride = stride;
    }
    t.fwd[kind][combo](p, 0, M);
    if (M > 2) t.fwd[kind][combo](p, 1, M - 1);  // a task that starts past row 0
    ++calls;
  }
  Buffer dy(rows, es, bf), dx(static_cast<size_t>(M * N), es, bf),
      grad_residual(fused ? rows : 0, es, bf);
  for (int variant = 0; variant < 2; ++variant) {
    std::vector<unsigned char> dw(N * as, 0), db(N * as, 0);
    BwdParams q;
    q.dy = dy.get();
    q.dy_stride = stride;
    q.x = fused ? residual_out.get() : x.get();
    q.x_stride = stride;
    q.mean = kind == 0 ? mean.get() : nullptr;
    q.rstd = rstd.get();
    q.weight = w.get();
    q.dx = variant == 0 ? dx.get() : nullptr;
    q.dx_stride = N;
    q.N = N;
    q.zero_centered_weight = variant == 1;
    q.short_rows_one_by_one = variant == 1;
    if (fused) {
      q.grad_residual = grad_residual.get();
      q.grad_residual_stride = stride;
    }
    void* dw_acc = has_w ? dw.data() : nullptr;
    void* db_acc = kind == 0 && (variant == 0 || !has_w) ? db.data() : nullptr;
    if (q.dx == nullptr && dw_acc == nullptr && db_acc == nullptr) continue;  // never launched
    t.bwd[kind][combo](q, 0, M, dw_acc, db_acc);
    if (M > 2) t.bwd[kind][combo](q, 1, M - 1, dw_acc, db_acc);
    ++calls;
  }
  if (M >= 2) {
    Buffer partials(static_cast<size_t>(M * N), as, false), out(N, ps, bf);
    t.column_sum[combo](partials.get(), M, N, 0, N, out.get());
    if (N > 2) t.column_sum[combo](partials.get(), M, N, 1, N - 1, out.get());
    ++calls;
  }
  return calls;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "scalar,avx2,avx512,avx512_bf16";
  const int64_t max_n = argc > 2 ? std::atol(argv[2]) : 140;
  const int64_t max_long = argc > 3 ? std::atol(argv[3]) : 20000;
  std::vector<int64_t> sizes;
  for (int64_t n = 1; n <= max_n; ++n) sizes.push_back(n);
  // Vector, short-row, widening, L1-group, apply-tile and chunk boundaries beyond max_n.
  for (int64_t n : {191,  255,  256,  257,  511,  512,  513,  767,  768,  769,
                    1000, 1023, 1024, 1025, 2047, 2049, 4095, 4100, 8193, 20000}) {
    if (n > max_n && n <= max_long) sizes.push_back(n);
  }
  const int64_t row_counts[] = {1, 2, 3, 4, 5, 9, 17};
  for (const Table& table : kTables) {
    if (!selected(which, table.name)) continue;
    const KernelTable& t = table.get();
    int64_t calls = 0;
    for (int kind = 0; kind < static_cast<int>(NormKind::kCount); ++kind) {
      for (int combo = 0; combo < static_cast<int>(DTypeCombo::kCount); ++combo) {
        for (const int64_t N : sizes) {
          for (const int64_t M : row_counts) {
            if (N > 1000 && M > 5) continue;
            for (int opt = 0; opt < 16; ++opt) calls += run_case(t, kind, combo, M, N, opt);
          }
        }
      }
    }
    std::printf("%s: %lld kernel calls\n", table.name, static_cast<long long>(calls));
  }
  return 0;
}
