// When the CPU forward may write its output with non-temporal stores (see norm_cpu.cpp,
// use_streaming_stores, for the size and alignment rules that apply on top of this).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace layernorm_ext::cpu {

enum class StreamPolicy {
  kAuto,  // where it measured faster: AMD CPUs, Intel CPUs with AMX (see stream_policy.cpp)
  kOn,    // every aligned output above the size threshold, fresh mappings included
  kOff,   // never
};

// The policy in use: read once from LAYERNORM_EXT_CPU_STREAM (auto | on | off), unless
// set_stream_policy changed it.
StreamPolicy stream_policy();

// Whether kAuto streams on this CPU.
bool streams_by_default();

// "auto", "on" or "off"; an unknown name is a clear error. Returns the previous name. Meant for
// tests and benchmarks: switch between calls, not while ops run on other threads.
std::string set_stream_policy(const std::string& name);

// The name of the policy in use.
std::string stream_policy_name();

// Input + output bytes from which a forward may stream: the last-level cache a core uses (sysfs),
// at least 32 MiB, unless set_stream_min_bytes set it (defined in norm_cpu.cpp).
int64_t stream_min_bytes();

// The byte count set_stream_min_bytes set, 0 for the default.
int64_t stream_min_bytes_setting();

// Sets that byte count (nullopt: back to the default); returns the previous setting. A count
// that is not positive is a clear error. For tests (the streamed path on any cache size) and for
// machines whose sysfs cache size misleads; switch between calls.
std::optional<int64_t> set_stream_min_bytes(std::optional<int64_t> bytes);

}  // namespace layernorm_ext::cpu
