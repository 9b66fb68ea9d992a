// Bindings of max pooling (pool_kernels.h) on NCHW planes.
#include "bind_common.h"

namespace winoprune_py {
namespace {

void max_pool_run(const py::handle& x_obj, index_t kh, index_t kw, index_t stride_h, index_t stride_w, index_t pad_top,
                  index_t pad_left, const py::handle& out_obj, int threads) {
  auto x = as_array<float>(x_obj, "x");
  auto out = as_array<float>(out_obj, "out", true);
  expect_ndim(x, 4, "x");
  expect_ndim(out, 4, "out");
  if (kh < 1 || kw < 1 || stride_h < 1 || stride_w < 1)
    throw py::value_error("kernel and stride must be >= 1");
  if (pad_top < 0 || pad_left < 0 || 2 * pad_top > kh || 2 * pad_left > kw)
    throw py::value_error("padding must be >= 0 and at most half the kernel, got (" + std::to_string(pad_top) + ", " +
                          std::to_string(pad_left) + ")");
  expect_shape(out, {x.shape(0), x.shape(1), out.shape(2), out.shape(3)}, "out");
  const index_t H = x.shape(2), W = x.shape(3), Ho = out.shape(2), Wo = out.shape(3);
  if (Ho != (H + 2 * pad_top - kh) / stride_h + 1 || Wo != (W + 2 * pad_left - kw) / stride_w + 1 || Ho < 1 || Wo < 1)
    throw py::value_error("out's spatial size (" + std::to_string(Ho) + ", " + std::to_string(Wo) +
                          ") does not match the input (" + std::to_string(H) + ", " + std::to_string(W) + ")");
  if (x.shape(0) == 0 || x.shape(1) == 0) return;
  const winoprune::PoolGeometry g{x.shape(0), x.shape(1), H, W, Ho, Wo, kh, kw, stride_h, stride_w, pad_top, pad_left};
  const int nt = resolve_threads(threads);
  const auto& table = winoprune::kernel_table(winoprune::detect_isa());
  const float* xp = x.data();
  float* yp = out.mutable_data();
  py::gil_scoped_release release;
  table.max_pool_forward(g, xp, yp, nt);
}

}  // namespace

void bind_pool(py::module_& mod) {
  mod.def("max_pool_run", &max_pool_run, py::arg("x"), py::arg("kh"), py::arg("kw"), py::arg("stride_h"),
          py::arg("stride_w"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"), py::arg("threads") = -1,
          "Max pooling of NCHW x into out (N, C, Ho, Wo); outside the input counts as -inf, NaN propagates.");
}

}  // namespace winoprune_py
