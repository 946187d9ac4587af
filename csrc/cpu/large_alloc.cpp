#include "large_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace layernorm_ext::cpu {
namespace {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
constexpr size_t kHugePage = size_t{2} << 20;

void free_huge(void* p) { std::free(p); }

// A CPU allocator whose blocks are 2 MiB-aligned and advised for transparent huge pages. Used only
// for large outputs; everything else goes through torch's own CPU allocator.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) {
      return {nullptr, nullptr, &free_huge, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, rounded) != 0 || p == nullptr) {
      // Fall back to torch's allocator (which reports out-of-memory the usual way).
      return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    }
    // Advisory: if THP is disabled this is a no-op and the pages are ordinary ones.
    (void)madvise(p, rounded, MADV_HUGEPAGE);
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_huge; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

HugePageAllocator g_huge_page_allocator;
#endif

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (options.device().is_cpu() && !options.requires_grad()) {
    size_t numel = 1;
    for (const int64_t s : sizes) {
      numel *= static_cast<size_t>(s);
    }
    const size_t nbytes = numel * options.dtype().itemsize();
    if (nbytes >= kHugePageThresholdBytes) {
      constexpr c10::DispatchKeySet cpu_ks(c10::DispatchKey::CPU);
      return at::detail::empty_generic(sizes, &g_huge_page_allocator, cpu_ks,
                                       options.dtype().toScalarType(),
                                       at::MemoryFormat::Contiguous);
    }
  }
#endif
  return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace layernorm_ext::cpu
