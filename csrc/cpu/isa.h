// Run-time choice of the CPU kernel table (one per instruction set compiled into the build).
#pragma once

#include <string>
#include <vector>

#include "kernel_api.h"

namespace layernorm_ext::cpu {

// The table in use. Chosen once, on first use, from the running CPU's features, unless the
// environment variable LAYERNORM_EXT_CPU_ISA names one
// (auto | avx512_bf16 | avx512 | avx2 | scalar).
const KernelTable& active_table();

// Name of the table in use ("avx512_bf16", "avx512", "avx2" or "scalar").
std::string capability();

// Whether the running CPU is an AMD one: a few memory-access choices (non-temporal stores,
// software prefetch of long rows) measured opposite ways on AMD and Intel CPUs.
bool is_amd();

// Whether this is an Intel CPU with AMX tiles (CPUID.7.0:EDX[24]): Sapphire Rapids and later
// Xeons. Only a generation marker for measured memory behaviour (stream_policy.cpp); nothing
// here runs AMX instructions.
bool is_intel_with_amx();

// Every ISA this build has and this CPU can run, best first.
std::vector<std::string> available_capabilities();

// Switches the table for the whole process ("auto" re-detects); returns the previous name.
// An ISA the CPU lacks, or an unknown name, is a clear error. Meant for tests and benchmarks:
// switch between calls, not while ops run on other threads.
std::string set_capability(const std::string& name);

}  // namespace layernorm_ext::cpu
