// Runtime ISA detection and the per-ISA kernel tables (compiled without any ISA flags).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "isa.h"

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// Linux hands out the AMX tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA) before its first tile instruction. Asked once; a refusal (old kernel, seccomp) disables AMX.
bool amx_granted() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

bool cpu_has_bf16(Bf16Path path) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  if (!cpu_has(Isa::avx512)) return false;
  const bool dp = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  switch (path) {
    case Bf16Path::avx512bf16:
      return dp;
    case Bf16Path::amx:
      return dp && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_granted();
    default:
      return false;
  }
#else
  (void)path;
  return false;
#endif
}

}  // namespace

bool bf16_supported(Bf16Path path) { return path == Bf16Path::none || cpu_has_bf16(path); }

Bf16Path detect_bf16() {
  if (detect_isa() != Isa::avx512) return Bf16Path::none;  // the bfloat16 kernels live in the avx512 build
  Bf16Path best = Bf16Path::none;
  for (Bf16Path path : {Bf16Path::avx512bf16, Bf16Path::amx})
    if (cpu_has_bf16(path)) best = path;
  if (const char* env = std::getenv("WINOPRUNE_BF16")) {
    const std::string want(env);
    Bf16Path cap = best;
    if (want == "none") cap = Bf16Path::none;
    else if (want == "avx512bf16") cap = Bf16Path::avx512bf16;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

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
