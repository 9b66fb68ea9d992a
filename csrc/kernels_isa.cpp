// Compiles the compute kernels for one ISA. CMake builds this file three times with
//   -DWINOPRUNE_ISA_NS=isa_generic|isa_avx2|isa_avx512 -DVW=<floats per vector> -DMR=<panel height>
// and the matching -m flags; everything it defines lives in winoprune::<WINOPRUNE_ISA_NS> (see isa.h).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "isa.h"
#if WINOPRUNE_ISA_ID > 0
#include <immintrin.h>
#endif

#if !defined(WINOPRUNE_ISA_NS) || !defined(VW) || !defined(MR) || !defined(WINOPRUNE_ISA_ID)
#error "kernels_isa.cpp needs WINOPRUNE_ISA_NS, WINOPRUNE_ISA_ID, VW and MR"
#endif

#define WINOPRUNE_STR2(x) #x
#define WINOPRUNE_STR(x) WINOPRUNE_STR2(x)

namespace winoprune {
namespace WINOPRUNE_ISA_NS {

#include "depthwise_kernels.h"
#include "pool_kernels.h"
#include "winograd_conv_kernels.h"
#include "training_kernels.h"
#include "peak.h"
#if WINOPRUNE_ISA_ID == 2
#include "winograd_bf16_kernels.h"
#endif

const KernelTable& table() {
  static const KernelTable t{static_cast<Isa>(WINOPRUNE_ISA_ID),
                             WINOPRUNE_STR(WINOPRUNE_ISA_NS) + 4,  // drop "isa_"
                             VW,
                             MR,
                             &winograd_workspace,
                             &winograd_forward,
                             &fma_peak_gflops,
#if WINOPRUNE_ISA_ID == 2
                             &winograd_bf16_workspace,
                             &winograd_bf16_forward,
#else
                             nullptr,
                             nullptr,
#endif
                             &depthwise_forward,
                             &max_pool_forward,
                             &train_BT,
                             &train_AT,
                             &train_input,
                             &train_input_adjoint,
                             &train_output,
                             &train_output_adjoint};
  return t;
}

}  // namespace WINOPRUNE_ISA_NS
}  // namespace winoprune
