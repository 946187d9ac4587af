#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace layernorm_ext::cpu {
namespace {

struct IsaEntry {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

bool always() { return true; }

#ifdef LNEXT_CPU_HAS_X86_ISAS
// __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif

// Best first.
const IsaEntry kIsas[] = {
#ifdef LNEXT_CPU_HAS_X86_ISAS
    {"avx512_bf16", &kernel_table_avx512_bf16, &has_avx512_bf16},
    {"avx512", &kernel_table_avx512, &has_avx512},
    {"avx2", &kernel_table_avx2, &has_avx2},
#endif
    {"scalar", &kernel_table_scalar, &always},
};

const KernelTable* best_table() {
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) {
      return &e.table();
    }
  }
  return &kernel_table_scalar();
}

const KernelTable* lookup(const std::string& requested, const char* origin) {
  const std::string name = requested == "default" ? "scalar" : requested;
  if (name.empty() || name == "auto") {
    return best_table();
  }
  std::string known;
  for (const IsaEntry& e : kIsas) {
    if (name == e.name) {
      TORCH_CHECK(e.supported(), "layernorm_ext: ", origin, " asks for the '", name,
                  "' CPU kernels, but this CPU does not support that instruction set. Available: ",
                  c10::Join(", ", available_capabilities()));
      return &e.table();
    }
    known += known.empty() ? "" : ", ";
    known += e.name;
  }
  TORCH_CHECK(false, "layernorm_ext: ", origin, " = '", requested,
              "' is not a CPU kernel set of this build; expected auto or one of: ", known);
}

std::atomic<const KernelTable*> g_table{nullptr};
std::mutex g_init_mutex;

}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (C10_LIKELY(t != nullptr)) {
    return *t;
  }
  std::lock_guard<std::mutex> lock(g_init_mutex);
  t = g_table.load(std::memory_order_relaxed);
  if (t == nullptr) {
    const char* env = std::getenv("LAYERNORM_EXT_CPU_ISA");
    t = lookup(env != nullptr ? std::string(env) : std::string(), "LAYERNORM_EXT_CPU_ISA");
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string capability() { return active_table().name; }

bool is_amd() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

bool is_intel_with_amx() {
#if defined(__x86_64__)
  static const bool amx = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __builtin_cpu_is("intel") && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 &&
           (edx & (1u << 24)) != 0;
  }();
  return amx;
#else
  return false;
#endif
}

std::vector<std::string> available_capabilities() {
  std::vector<std::string> out;
  for (const IsaEntry& e : kIsas) {
    if (e.supported()) {
      out.emplace_back(e.name);
    }
  }
  return out;
}

std::string set_capability(const std::string& name) {
  const std::string previous = capability();
  const KernelTable* t = lookup(name, "set_cpu_capability");
  std::lock_guard<std::mutex> lock(g_init_mutex);
  g_table.store(t, std::memory_order_release);
  return previous;
}

}  // namespace layernorm_ext::cpu
