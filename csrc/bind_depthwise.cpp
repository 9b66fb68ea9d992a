// Bindings of the pruned depthwise conv (depthwise_kernels.h): a plan of kept taps per channel, as arrays the torch
// custom op winoprune::depthwise_conv keeps in module buffers (see bind_winograd.cpp for why arrays).
//
// meta (int64): a header of kDwHeader entries named by DwField, then tap_begin (C + 1).
// taps (int32): dy of every tap then dx; weights (float32).
#include "bind_common.h"
#include "winograd_conv.h"

namespace winoprune_py {
namespace {

constexpr index_t kDwFormat = 1, kDwHeader = 8;
enum DwField : index_t { d_format = 0, d_C = 1, d_kh = 2, d_kw = 3, d_stride_h = 4, d_stride_w = 5, d_taps = 6 };

py::tuple plan_arrays(const winoprune::DepthwisePlan& pl) {
  std::vector<index_t> meta(kDwHeader, 0);
  meta[d_format] = kDwFormat;
  meta[d_C] = pl.C;
  meta[d_kh] = pl.kh;
  meta[d_kw] = pl.kw;
  meta[d_stride_h] = pl.stride_h;
  meta[d_stride_w] = pl.stride_w;
  meta[d_taps] = pl.kept();
  meta.insert(meta.end(), pl.tap_begin.begin(), pl.tap_begin.end());
  std::vector<std::int32_t> taps(pl.tap_dy);
  taps.insert(taps.end(), pl.tap_dx.begin(), pl.tap_dx.end());
  return py::make_tuple(to_numpy(meta), to_numpy(taps), to_numpy(pl.tap_w));
}

// A depthwise weight (C, kh, kw) and its mask packed as kept taps, as (meta, taps, weights).
py::tuple pack_depthwise(const py::handle& w_obj, const py::handle& mask_obj, int stride_h, int stride_w,
                               const py::object& bias_obj) {
  auto w = as_array<float>(w_obj, "weight");
  auto mask = as_array<bool>(mask_obj, "mask");
  expect_ndim(w, 3, "weight");
  if (w.shape(0) < 1 || w.shape(1) < 1 || w.shape(2) < 1)
    throw py::value_error("weight must be (C, kh, kw) with every size >= 1, got " + shape_str(w));
  expect_shape(mask, {w.shape(0), w.shape(1), w.shape(2)}, "mask");
  if (stride_h < 1 || stride_w < 1)
    throw py::value_error("stride must be >= 1, got (" + std::to_string(stride_h) + ", " + std::to_string(stride_w) +
                          ")");
  const float* bias = nullptr;
  carray<float> b;
  if (!bias_obj.is_none()) {
    b = as_array<float>(bias_obj, "bias");
    expect_shape(b, {w.shape(0)}, "bias");
    bias = b.data();
  }
  return plan_arrays(winoprune::pack_depthwise(w.data(), mask.data(), w.shape(0), static_cast<int>(w.shape(1)),
                                       static_cast<int>(w.shape(2)), stride_h, stride_w, bias));
}

void depthwise_run(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& taps_obj,
                   const py::handle& w_obj, const py::object& bias_obj, int act, index_t pad_top, index_t pad_left,
                   const py::handle& out_obj, int threads) {
  auto x = as_array<float>(x_obj, "x");
  auto out = as_array<float>(out_obj, "out", true);
  auto meta = as_array<index_t>(meta_obj, "meta");
  auto taps = as_array<std::int32_t>(taps_obj, "taps");
  auto w = as_array<float>(w_obj, "weights");
  carray<float> b;
  index_t n_bias = 0;
  const float* bias = optional_bias(bias_obj, b, n_bias);
  const index_t* h = meta.data();
  if (meta.size() < kDwHeader || h[d_format] != kDwFormat) bad_plan("meta has an unknown format");
  const index_t C = h[d_C], kh = h[d_kh], kw = h[d_kw], sh = h[d_stride_h], sw = h[d_stride_w], n_taps = h[d_taps];
  if (C < 1 || kh < 1 || kw < 1 || kh > 64 || kw > 64 || sh < 1 || sw < 1 || n_taps < 0) bad_plan("bad C, kernel or stride");
  if (meta.size() != kDwHeader + C + 1) bad_plan("meta must hold C + 1 tap offsets");
  const Seg tap_begin{h + kDwHeader, C + 1};
  check_monotone(tap_begin, 0, n_taps, "tap_begin");
  const index_t n_alloc = std::max<index_t>(n_taps, 1);
  if (taps.size() != 2 * n_alloc || w.size() < n_taps) bad_plan("taps / weights do not match the tap count");
  const std::int32_t* dy = taps.data();
  const std::int32_t* dx = dy + n_alloc;
  for (index_t t = 0; t < n_taps; ++t)
    if (dy[t] < 0 || dy[t] >= kh || dx[t] < 0 || dx[t] >= kw) bad_plan("a tap lies outside the kernel");
  check_activation(act);
  if (bias && n_bias != C) throw py::value_error("bias must have shape (" + std::to_string(C) + ",)");
  expect_ndim(x, 4, "x");
  expect_ndim(out, 4, "out");
  if (x.shape(1) != C) throw py::value_error("x must have " + std::to_string(C) + " channels, got shape " + shape_str(x));
  expect_shape(out, {x.shape(0), C, out.shape(2), out.shape(3)}, "out");
  if (x.shape(0) == 0) return;
  if (x.shape(2) < 1 || x.shape(3) < 1) throw py::value_error("x must have a non-empty spatial size");
  check_conv_geometry(x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2), out.shape(3), kh, kw, sh, sw);
  const winoprune::DepthwisePlanView view{C, static_cast<int>(kh), static_cast<int>(kw), static_cast<int>(sh),
                                          static_cast<int>(sw), tap_begin.p, dy, dx, w.data(), bias, act};
  const winoprune::DepthwiseGeometry g{x.shape(0), x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2),
                                       out.shape(3)};
  const int nt = resolve_threads(threads);
  const auto& table = winoprune::kernel_table(winoprune::detect_isa());
  const float* xp = x.data();
  float* yp = out.mutable_data();
  py::gil_scoped_release release;
  table.depthwise_forward(view, g, xp, yp, nt);
}

}  // namespace

void bind_depthwise(py::module_& mod) {
  mod.def("pack_depthwise", &pack_depthwise, py::arg("weight"), py::arg("mask"), py::arg("stride_h") = 1,
          py::arg("stride_w") = 1, py::arg("bias") = py::none(),
          "Pack a depthwise weight (C, kh, kw) float32 and its bool mask as kept taps per channel; returns the plan "
          "as (meta int64, taps int32, weights float32) arrays for depthwise_run.");
  mod.def("depthwise_run", &depthwise_run, py::arg("x"), py::arg("meta"), py::arg("taps"), py::arg("weights"),
          py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1,
          "Pruned depthwise conv of x into out from a plan's arrays (validated), with a fused activation.");
}

}  // namespace winoprune_py
