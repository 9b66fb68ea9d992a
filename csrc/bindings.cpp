// The pybind11 module lightning_winoprune.kernels._C: torch-free C++17 kernels on float32 buffers.
// The kernels live in the headers; each bind_*.cpp validates and dispatches one kernel family (bind_common.h holds
// the shared checks): bind_training.cpp (training tile transforms), bind_winograd.cpp (pruned Winograd inference
// conv), bind_winograd_bf16.cpp (its bfloat16 form), bind_depthwise.cpp (pruned depthwise conv), bind_pool.cpp
// (max pooling).
#include "bind_common.h"

PYBIND11_MODULE(_C, mod) {
  namespace py = pybind11;
  using namespace winoprune_py;
  mod.doc() = "lightning_winoprune native kernels (torch-free C++17 on float32 buffers).";
  bind_training(mod);
  bind_winograd(mod);
  bind_winograd_bf16(mod);
  bind_depthwise(mod);
  bind_pool(mod);
  mod.def("isa", [] { return isa_name(winoprune::detect_isa()); },
          "The ISA the kernels dispatch to: the widest this CPU supports, capped by $WINOPRUNE_ISA.");
  mod.def("supported_isas", &supported_isas, "ISAs this CPU (and this build) can run.");
  mod.def("max_threads", &winoprune::max_threads, "Threads the kernels use (OpenMP max threads, 1 without OpenMP).");
  py::tuple names(winoprune::n_activations);
  for (int i = 0; i < winoprune::n_activations; ++i) names[i] = py::str(winoprune::activation_names[i]);
  mod.attr("activation_names") = names;  // code i of the fused activation is activation_names[i]
#if defined(_OPENMP)
  mod.attr("openmp") = true;
#else
  mod.attr("openmp") = false;
#endif
}
