// The multiply-add peak of one ISA's vectors: what a compute kernel compiled for it can reach on this CPU.
//
// Included only by kernels_isa.cpp, inside one ISA namespace per compilation (see isa.h); VW comes from there.
// Torch-free. Each thread runs kChains independent accumulator chains (enough to cover the FMA latency times the
// FMA units of current x86 cores: 4 cycles x 2 units) of acc = acc * a + b, contracted to one FMA per vector
// (-ffp-contract=fast; the portable build has no FMA and runs a multiply and an add).
#pragma once

#include <chrono>

#include "isa.h"

namespace peak_detail {

typedef float pk_vf __attribute__((vector_size(VW * 4)));
constexpr int kChains = 12;

inline double chains(index_t iters) {
  pk_vf acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = pk_vf{} + static_cast<float>(j);
  const pk_vf a = pk_vf{} + 0.999999f, b = pk_vf{} + 1e-6f;
  for (index_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * a + b;  // float: no reassociation, every round runs
  }
  double sink = 0.0;
  for (int j = 0; j < kChains; ++j)
    for (int l = 0; l < VW; ++l) sink += acc[j][l];
  return sink;
}

}  // namespace peak_detail

inline double fma_peak_gflops(int threads, index_t iters) {
  using clock = std::chrono::steady_clock;
  threads = threads < 1 ? 1 : threads;
  volatile double sink = 0.0;
  peak_detail::chains(iters / 16 + 1);  // wake the vector units (and the clock) up before timing
  const auto start = clock::now();
#pragma omp parallel num_threads(threads)
  {
    const double s = peak_detail::chains(iters);
#pragma omp atomic
    sink += s;
  }
  const double seconds = std::chrono::duration<double>(clock::now() - start).count();
  (void)sink;
  const double flops = 2.0 * threads * static_cast<double>(iters) * peak_detail::kChains * VW;
  return seconds > 0.0 ? flops / seconds / 1e9 : 0.0;
}
