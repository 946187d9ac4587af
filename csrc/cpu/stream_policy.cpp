#include "stream_policy.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>

#include "isa.h"

namespace layernorm_ext::cpu {
namespace {

constexpr int kUnset = -1;
std::atomic<int> g_policy{kUnset};

const char* name_of(StreamPolicy p) {
  switch (p) {
    case StreamPolicy::kOn:
      return "on";
    case StreamPolicy::kOff:
      return "off";
    default:
      return "auto";
  }
}

StreamPolicy parse(const std::string& name, const char* origin) {
  if (name.empty() || name == "auto") return StreamPolicy::kAuto;
  if (name == "on") return StreamPolicy::kOn;
  if (name == "off") return StreamPolicy::kOff;
  TORCH_CHECK(false, "layernorm_ext: ", origin, " = '", name,
              "' is not a streaming policy; expected auto, on or off");
}

}  // namespace

// Non-temporal stores skip the read-for-ownership of every output line, a third of a
// normalisation's memory traffic, but each core then drains its write-combining buffers to
// memory itself. They apply only once input and output together fill the last-level cache
// (norm_cpu.cpp, use_streaming_stores). Measured with 2 threads, out= into a 64-byte-aligned
// buffer, plain vs streamed:
//  * AMD EPYC (Zen 4, 2-vCPU VM): streaming faster, e.g. fp16 16384 x 768 0.53-0.56 -> 0.60-0.84
//    and fp32 2048 x 2048 0.37-0.43 -> 0.66-0.78 of copy_'s bandwidth;
//  * Intel Xeon (Skylake-SP, 2-vCPU VM, 2026-11-27): streaming slower (ms), fp32 2048 x 4096
//    4.17-4.22 -> 4.47-4.64, fp32 16384 x 1024 7.19-7.34 -> 7.47-7.50, bf16 16384 x 768
//    3.03-3.04 -> 3.46-3.74, bf16 16384 x 4096 19.1-19.4 -> 21.6-22.2, fp16 16384 x 4096
//    16.2-16.5 -> 19.9-20.4 (copy_ of the same bytes: 2.98, 6.2, 2.2, 12.4, 12.3);
//  * Intel Xeon with AMX (2-vCPU VM, 480 MiB L3 in sysfs, 2026-11-28; median of 9 paired
//    rounds, ours / copy_ in ms, fraction of copy_'s bandwidth): streaming faster beyond the
//    L3, fp32 16384 x 4096 25.6 / 23.0 (0.90) -> 17.3 / 22.7 (1.32), fp32 16384 x 8192
//    50.7 / 44.9 (0.89) -> 33.2 / 43.6 (1.32), bf16 16384 x 8192 25.9 / 22.3 (0.86) ->
//    19.7 / 22.3 (1.14); fresh outputs too (functional, median of 7, plain -> streamed: bf16
//    16384 x 8192 44.1 -> 38.4 ms, fp32 16384 x 4096 42.8 -> 36.1 ms; F.layer_norm 109, 79 ms).
//    Below the L3 size the two are alike (bf16 16384 x 4096 0.85 -> 0.84).
// So the default streams on AMD CPUs and on Intel CPUs with AMX (the generation measured
// faster), not on older Intel ones; LAYERNORM_EXT_CPU_STREAM=on|off overrides it.
bool streams_by_default() {
  static const bool streams = is_amd() || is_intel_with_amx();
  return streams;
}

StreamPolicy stream_policy() {
  int p = g_policy.load(std::memory_order_relaxed);
  if (C10_UNLIKELY(p == kUnset)) {
    const char* env = std::getenv("LAYERNORM_EXT_CPU_STREAM");
    p = static_cast<int>(
        parse(env != nullptr ? std::string(env) : std::string(), "LAYERNORM_EXT_CPU_STREAM"));
    int expected = kUnset;
    g_policy.compare_exchange_strong(expected, p, std::memory_order_relaxed);
    p = g_policy.load(std::memory_order_relaxed);
  }
  return static_cast<StreamPolicy>(p);
}

std::string stream_policy_name() { return name_of(stream_policy()); }

namespace {
std::atomic<int64_t> g_min_bytes{0};  // 0: the default (norm_cpu.cpp)
}  // namespace

int64_t stream_min_bytes_setting() { return g_min_bytes.load(std::memory_order_relaxed); }

std::optional<int64_t> set_stream_min_bytes(std::optional<int64_t> bytes) {
  TORCH_CHECK(!bytes.has_value() || *bytes > 0,
              "layernorm_ext: set_cpu_stream_min_bytes expects a positive byte count or None, got ",
              bytes.value_or(0));
  const int64_t previous = g_min_bytes.exchange(bytes.value_or(0), std::memory_order_relaxed);
  return previous > 0 ? std::optional<int64_t>(previous) : std::nullopt;
}

std::string set_stream_policy(const std::string& name) {
  const std::string previous = stream_policy_name();
  g_policy.store(static_cast<int>(parse(name, "set_cpu_stream_policy")), std::memory_order_relaxed);
  return previous;
}

}  // namespace layernorm_ext::cpu
