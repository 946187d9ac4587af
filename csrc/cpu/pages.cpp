// Residency test and transparent huge pages for freshly allocated outputs (see pages.h).
//
// Why: an output the op allocates (the functional forms, dx of the backward, the fused add's
// updated residual) larger than the allocator keeps is a fresh anonymous mapping, and each of its
// 4 KiB pages faults on its first write. In this project's 2-vCPU VM (Xeon Skylake-SP, Linux
// 6.18, THP "madvise") a 32 MiB fp32 output cost ~16-21 ms to fault in against ~4 ms to compute
// with out=: functional LayerNorm on a 2048 x 4096 fp32 input ran at 0.98x F.layer_norm, both
// page-fault-bound (benchmarks/results/cpu_targets_2026-11-28_*).
//
// What: the buffer's whole huge pages are advised (MADV_HUGEPAGE) and then faulted in by torch's
// intra-op threads, a slice each (MADV_POPULATE_WRITE, Linux >= 5.14; where it is missing the
// first writes fault them in). Measured there (2 threads, layer_norm(out=) into a fresh
// 2048 x 4096 fp32 buffer, median of 9 calls, 8 processes): 4 KiB pages 15-21 ms, huge pages
// faulted by the kernel's two threads 7.8-18.9 ms (some processes fast, some not: see the quirk
// below), huge pages populated first by the calling thread alone 9.9-11.7 ms, populating 4 KiB
// pages 17-21 ms; F.layer_norm 18.5-25.5 ms. Populating with every thread: below.
//
// When: only while the kernel has enough free blocks of huge-page size (/proc/buddyinfo) for the
// whole range, twice over. Where it has not (memory fragmented, e.g. filled by the page cache), a
// huge-page fault in a madvised range stalls in direct compaction: an earlier version of this
// project, which advised every large output, measured 30-40 ms stalls on 60% of 2048 x 4096 fp32
// calls once memory had fragmented (AMD EPYC VM, 2026-11-26; F.layer_norm took 9 ms) and was
// removed. Reading buddyinfo costs tens of us (42 us from Python), against >= 1 ms for the
// outputs concerned.
//
// Torch offers huge pages for all of its CPU allocations as an opt-in (THP_MEM_ALLOC_ENABLE=1,
// 2 MiB-aligned allocations). Here only the huge pages already inside the buffer are advised: no
// alignment padding, no extra memory, and the allocator's own header page is left alone. A
// buffer whose middle page is already resident is memory the allocator reuses: it faults no
// more, so it is left alone too (and never split into separate mappings).

#include "pages.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace layernorm_ext::cpu {
namespace {

// Below this a buffer holds at most one whole huge page, and its faults cost little next to the
// syscalls (two: mincore, madvise; ~1 us each in the VM).
constexpr int64_t kMinBytes = int64_t{4} << 20;

// Where advise_huge_pages acts: huge_page bytes (nonzero only with THP in "madvise" mode).
struct Mode {
  std::uintptr_t huge_page = 0;
  int order = 0;  // huge_page = base page << order
};

#if defined(__linux__)
// The contents of a small sysfs file (at most 255 bytes), or "" when unreadable.
std::string read_small_file(const char* path) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  char text[256] = {};
  const ssize_t got = ::read(fd, text, sizeof(text) - 1);
  ::close(fd);
  return got > 0 ? std::string(text, static_cast<size_t>(got)) : std::string();
}

// Free blocks of at least `order` (2^order base pages), counted in blocks of that order, over
// every zone (/proc/buddyinfo: "Node 0, zone Normal c0 c1 ... c10", ci free blocks of order i);
// 0 when unreadable.
int64_t free_blocks_of_order(int order) {
  const int fd = ::open("/proc/buddyinfo", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char text[4096];
  const ssize_t got = ::read(fd, text, sizeof(text) - 1);
  ::close(fd);
  if (got <= 0) return 0;
  text[got] = '\0';
  int64_t blocks = 0;
  for (char* line = text; line != nullptr && *line != '\0';) {
    char* next = std::strchr(line, '\n');
    if (next != nullptr) *next++ = '\0';
    // The counts follow the zone's name, the fourth word.
    char* p = line;
    for (int word = 0; word < 4 && *p != '\0'; ++word) {
      while (*p == ' ') ++p;
      while (*p != ' ' && *p != '\0') ++p;
    }
    for (int k = 0; *p != '\0'; ++k) {
      char* end = nullptr;
      const long long count = std::strtoll(p, &end, 10);
      if (end == p) break;
      if (k >= order && k - order < 30) blocks += count << (k - order);
      p = end;
    }
    line = next;
  }
  return blocks;
}
#endif

Mode detect() {
  Mode m;
  const char* env = std::getenv("LAYERNORM_EXT_CPU_HUGE_PAGES");
  const std::string setting = env != nullptr ? env : "";
  TORCH_CHECK(setting.empty() || setting == "auto" || setting == "off",
              "layernorm_ext: LAYERNORM_EXT_CPU_HUGE_PAGES = '", setting,
              "' is not a huge-page setting; expected auto or off");
  if (setting == "off") return m;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // e.g. "always [madvise] never": the bracketed word is the mode in force. "always" already
  // gives every large mapping huge pages; "never" gives none.
  const std::string enabled = read_small_file("/sys/kernel/mm/transparent_hugepage/enabled");
  if (enabled.find("[madvise]") != std::string::npos) {
    const std::string size = read_small_file("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    const unsigned long long bytes = std::strtoull(size.c_str(), nullptr, 10);
    // A power of two of at least two base pages, or THP is not what it seems: leave it alone.
    const auto page = static_cast<unsigned long long>(sysconf(_SC_PAGESIZE));
    if (bytes >= 2 * page && (bytes & (bytes - 1)) == 0) {
      m.huge_page = static_cast<std::uintptr_t>(bytes);
      while ((page << m.order) < bytes) ++m.order;
    }
  }
#endif
  return m;
}

const Mode& mode() {
  static const Mode m = detect();
  return m;
}

}  // namespace

bool middle_page_resident(const void* data, int64_t bytes) {
#if defined(__linux__)
  static const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  const std::uintptr_t middle =
      (reinterpret_cast<std::uintptr_t>(data) + static_cast<std::uintptr_t>(bytes / 2)) &
      ~(page - 1);
  unsigned char resident = 0;
  return mincore(reinterpret_cast<void*>(middle), page, &resident) == 0 && (resident & 1) != 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

void advise_huge_pages(void* data, int64_t bytes) {
  if (bytes < kMinBytes) return;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const std::uintptr_t huge = mode().huge_page;
  if (huge == 0) return;
  const auto start = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (start + huge - 1) & ~(huge - 1);
  const std::uintptr_t last = (start + static_cast<std::uintptr_t>(bytes)) & ~(huge - 1);
  if (last <= first) return;
  if (middle_page_resident(data, bytes)) return;  // reused memory (see above)
  const auto needed = static_cast<int64_t>((last - first) / huge);
  if (free_blocks_of_order(mode().order) < 2 * needed) return;  // would compact (see above)
  // Advice only: a failure (e.g. EINVAL on a kernel without THP) leaves ordinary pages, and a
  // failed populate leaves the faults to the first writes.
  void* range = reinterpret_cast<void*>(first);
  if (madvise(range, last - first, MADV_HUGEPAGE) != 0) return;
#if defined(MADV_POPULATE_WRITE)
  // Faulted in by torch's intra-op threads, a run of whole huge pages each: the kernel zeroes
  // every page in the thread that faults it, so one thread zeroes at one core's speed. Measured
  // in this project's 2-vCPU VM (Xeon Skylake-SP, 2 threads): 256 MiB of huge pages populated in
  // 50 ms by one thread, 26 ms by two (C probe, fresh mappings); functional LayerNorm on a
  // 2048 x 4096 fp32 input (a 32 MiB output) 12.6-15.0 ms -> 9.1-11.5 ms per call.
  // A quirk of that VM: in a fresh process the second thread faulted its first ~100 MiB of huge
  // pages at ~3 ms per page (0.4 later), so the first 8-10 such calls took 27-35 ms; after three
  // parallel fills of a 256 MiB tensor they did not (consistent with a host that backs guest
  // memory unused for a while only on first touch).
  at::parallel_for(0, needed, 1, [&](int64_t begin, int64_t end) {
    (void)madvise(reinterpret_cast<void*>(first + static_cast<std::uintptr_t>(begin) * huge),
                  static_cast<size_t>(end - begin) * huge, MADV_POPULATE_WRITE);
  });
#endif
#else
  (void)data;
#endif
}

}  // namespace layernorm_ext::cpu
