// Output allocation for large CPU tensors, backed by transparent huge pages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

namespace layernorm_ext::cpu {

// Outputs at least this large are allocated 2 MiB-aligned and advised MADV_HUGEPAGE.
//
// Why: glibc serves allocations of 32 MiB and more (its largest dynamic mmap threshold) with a
// fresh mmap every time, and every 4 KiB page of it then faults on first write. For a norm (one
// read, one write per element) those faults, not the kernel, set the speed: measured here,
// F.layer_norm on 2048x4096 fp32 took ~7x the time of a copy into a warm buffer. With transparent
// huge pages in "madvise" mode (the default on these servers) one fault maps 2 MiB instead of
// 4 KiB. Smaller outputs stay with torch's allocator: glibc recycles those blocks warm, and a
// fresh huge-page block would be slower (measured: an 8 MiB dx re-zeroed on every call).
// The storage is an ordinary resizable CPU storage.
constexpr size_t kHugePageThresholdBytes = size_t{32} << 20;

// at::empty(sizes, options) (contiguous) for a CPU tensor, using huge pages when it is large and
// the platform supports them.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace layernorm_ext::cpu
