// When the CPU forward may write its output with non-temporal stores (see norm_cpu.cpp,
// use_streaming_stores, for the size and alignment rules that apply on top of this).
#pragma once

#include <string>

namespace layernorm_ext::cpu {

enum class StreamPolicy {
  kAuto,  // where it measured faster: AMD CPUs (see stream_policy.cpp)
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

}  // namespace layernorm_ext::cpu
