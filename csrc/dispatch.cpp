// Runtime ISA detection and the per-ISA kernel tables (compiled without any ISA flags).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "isa.h"

namespace winoprune {

namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::generic:
      return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

}  // namespace

bool isa_supported(Isa isa) { return cpu_has(isa); }

Isa detect_isa() {
  Isa best = Isa::generic;
  for (Isa isa : {Isa::avx2, Isa::avx512})
    if (cpu_has(isa)) best = isa;
  if (const char* env = std::getenv("WINOPRUNE_ISA")) {
    const std::string want(env);
    Isa cap = best;
    if (want == "generic") cap = Isa::generic;
    else if (want == "avx2") cap = Isa::avx2;
    else if (want == "avx512") cap = Isa::avx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

const KernelTable& kernel_table(Isa isa) {
  if (!cpu_has(isa)) throw std::invalid_argument("this CPU does not support the requested ISA");
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512:
      return isa_avx512::table();
    case Isa::avx2:
      return isa_avx2::table();
#endif
    default:
      return isa_generic::table();
  }
}

}  // namespace winoprune
