// Paging of the buffers the CPU ops write: whether one is already resident, and transparent huge
// pages for the large outputs the ops allocate themselves.
#pragma once

#include <cstdint>

namespace layernorm_ext::cpu {

// Whether the page holding the middle of a buffer is already mapped in. A buffer just allocated
// is either memory the allocator reuses (resident) or a fresh mapping, whose every page faults on
// its first write; the allocator's own header sits at the start of a mapping, so the middle tells
// them apart. Unknown (not Linux) counts as fresh.
bool middle_page_resident(const void* data, int64_t bytes);

// Asks the kernel to back the whole huge pages inside [data, data + bytes) with transparent huge
// pages (madvise MADV_HUGEPAGE) and faults them in (MADV_POPULATE_WRITE), where that pays: a
// buffer of at least 4 MiB that is a fresh mapping (its first writes would page-fault), on Linux
// with THP in "madvise" mode, while the kernel has free huge-page blocks for it twice over (else
// the faults would wait for compaction). Elsewhere a no-op. LAYERNORM_EXT_CPU_HUGE_PAGES=off
// (read on first use) turns it off; auto is the default. Only the mapping's paging changes, never
// its contents: results are the same either way.
void advise_huge_pages(void* data, int64_t bytes);

}  // namespace layernorm_ext::cpu
