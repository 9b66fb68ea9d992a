// Shared helpers for the lightning_winoprune native kernels. Torch-free: raw pointers only.
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#define WINOPRUNE_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define WINOPRUNE_PARALLEL_FOR
#endif

namespace winoprune {

using index_t = std::int64_t;

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace winoprune
