// Bindings of the pruned Winograd inference conv (winograd_conv.h, winograd_conv_kernels.h).
//
// A packed plan crosses into Python as plain arrays, which the torch custom op winoprune::winograd_conv keeps in
// module buffers (so a deployed model deep-copies, saves, compiles and exports). They go out once (pack_winograd) and
// come back on every call (winograd_run), where they are validated before any kernel reads them: a damaged or
// hand-made state_dict raises ValueError instead of reading out of bounds. Python reads a plan's properties through
// winograd_plan_info (a typed struct), never by index.
//
// meta (int64): a header of kWinoHeader entries named by WinoField, then the index segments in the order of
// WinoSegment, whose offsets into meta sit at [f_segments, f_segments + n_segments].
// cols (int32): panel_cols then csr_cols; vals (float32): A then csr_vals; acc (uint8): panel_row_acc.
#include "bind_common.h"
#include "winograd_conv.h"

namespace winoprune_py {
namespace {

constexpr index_t kWinoFormat = 1, kWinoHeader = 32;
enum WinoField : index_t {
  f_format = 0, f_p = 1, f_m = 2, f_mr = 3, f_K = 4, f_C = 5, f_csr = 6, f_isa = 7, f_items = 8, f_kept = 9,
  f_work = 10, f_panel_cols = 11,  // length of cols' panel part (the rest is csr_cols)
  f_a_len = 12,                    // length of vals' panel part (the rest is csr_vals)
  f_segments = 16,
};
enum WinoSegment : index_t {
  s_panel_begin, s_panel_xi, s_panel_row_begin, s_panel_rows, s_item_begin, s_panel_col_begin, s_panel_a_begin,
  s_zero_begin, s_zero_rows, s_row_ptr, n_segments,
};
static_assert(f_segments + n_segments < kWinoHeader, "the segment offsets must fit in the header");

thread_local std::vector<float> tls_workspace;  // per calling thread: concurrent calls never share scratch memory

py::tuple plan_arrays(const winoprune::WinogradPlan& pl) {
  const std::vector<const std::vector<index_t>*> segs = {&pl.panel_begin, &pl.panel_xi, &pl.panel_row_begin,
                                                         &pl.panel_rows, &pl.item_begin, &pl.panel_col_begin,
                                                         &pl.panel_a_begin, &pl.zero_begin, &pl.zero_rows,
                                                         &pl.row_ptr};
  std::vector<index_t> meta(kWinoHeader, 0);
  meta[f_format] = kWinoFormat;
  meta[f_p] = pl.p;
  meta[f_m] = pl.m;
  meta[f_mr] = pl.mr;
  meta[f_K] = pl.K;
  meta[f_C] = pl.C;
  meta[f_csr] = pl.csr ? 1 : 0;
  meta[f_isa] = static_cast<index_t>(pl.isa);
  meta[f_items] = static_cast<index_t>(pl.item_begin.empty() ? 0 : pl.item_begin.size() - 1);
  meta[f_kept] = pl.kept;
  meta[f_work] = pl.work;
  meta[f_panel_cols] = static_cast<index_t>(pl.panel_cols.size());
  meta[f_a_len] = static_cast<index_t>(pl.A.size());
  for (index_t s = 0; s < n_segments; ++s) {
    meta[f_segments + s] = static_cast<index_t>(meta.size());
    meta.insert(meta.end(), segs[s]->begin(), segs[s]->end());
  }
  meta[f_segments + n_segments] = static_cast<index_t>(meta.size());
  std::vector<std::int32_t> cols(pl.panel_cols);
  cols.insert(cols.end(), pl.csr_cols.begin(), pl.csr_cols.end());
  std::vector<float> vals(pl.A);
  vals.insert(vals.end(), pl.csr_vals.begin(), pl.csr_vals.end());
  return py::make_tuple(to_numpy(meta), to_numpy(cols), to_numpy(vals), to_numpy(pl.panel_row_acc));
}

// U (p*p, K, C) and its mask packed for the kernels of this CPU's ISA, as (meta, cols, vals, acc).
py::tuple pack_winograd(const py::handle& U_obj, const py::handle& mask_obj, int m, const py::object& bias_obj,
                        bool csr) {
  auto U = as_array<float>(U_obj, "U");
  auto mask = as_array<bool>(mask_obj, "mask");
  check_winograd_weights(U, mask, m);
  carray<float> b;
  index_t n_bias = 0;
  const float* bias = optional_bias(bias_obj, b, n_bias);
  if (bias) expect_shape(b, {U.shape(1)}, "bias");
  const auto isa = winoprune::detect_isa();
  const int mr = winoprune::kernel_table(isa).mr;
  const float* up = U.data();
  const bool* mp = mask.data();
  winoprune::WinogradPlan plan;
  {
    py::gil_scoped_release release;
    plan = winoprune::pack_winograd(up, mp, m, U.shape(1), U.shape(2), bias, csr, isa, mr);
  }
  return plan_arrays(plan);
}

winoprune::WinogradPlanView winograd_view(const carray<index_t>& meta, const carray<std::int32_t>& cols,
                                          const carray<float>& vals, const carray<std::uint8_t>& acc,
                                          const float* bias, index_t n_bias, int act, int mr_run) {
  const index_t nm = meta.size();
  const index_t* h = meta.data();
  if (nm < kWinoHeader + n_segments || h[f_format] != kWinoFormat) bad_plan("meta has an unknown format");
  const int p = static_cast<int>(h[f_p]), m = static_cast<int>(h[f_m]), mr = static_cast<int>(h[f_mr]);
  const index_t K = h[f_K], C = h[f_C];
  const bool csr = h[f_csr] != 0;
  if (!((p == 4 && m == 2) || (p == 6 && m == 4))) bad_plan("p, m must be (4, 2) or (6, 4)");
  if (K < 1 || C < 1 || C > INT32_MAX || mr < 1 || mr > 64 || h[f_csr] < 0 || h[f_csr] > 1) bad_plan("bad K, C, mr or csr");
  check_activation(act);
  if (bias && n_bias != K) throw py::value_error("bias must have shape (" + std::to_string(K) + ",)");
  const index_t P2 = static_cast<index_t>(p) * p;
  Seg seg[n_segments];
  for (index_t s = 0; s < n_segments; ++s) {
    const index_t b = h[f_segments + s], e = h[f_segments + s + 1];
    if (b < kWinoHeader || e < b || e > nm) bad_plan("meta's segment offsets are out of range");
    seg[s] = {h + b, e - b};
  }
  if (h[f_segments + n_segments] != nm) bad_plan("meta's last offset must be its length");
  const Seg &panel_begin = seg[s_panel_begin], &panel_xi = seg[s_panel_xi], &panel_row_begin = seg[s_panel_row_begin],
            &panel_rows = seg[s_panel_rows], &item_begin = seg[s_item_begin], &panel_col_begin = seg[s_panel_col_begin],
            &panel_a_begin = seg[s_panel_a_begin], &zero_begin = seg[s_zero_begin], &zero_rows = seg[s_zero_rows],
            &row_ptr = seg[s_row_ptr];
  const index_t n_pcols = h[f_panel_cols], n_a = h[f_a_len];
  if (n_pcols < 0 || n_pcols > cols.size() || n_a < 0 || n_a > vals.size()) bad_plan("cols / vals are too short");
  const std::int32_t* cp = cols.data();
  const float* vp = vals.data();
  if (csr) {
    if (row_ptr.n != P2 * K + 1) bad_plan("row_ptr must have p*p*K + 1 entries");
    const index_t n_csr = std::min(cols.size() - n_pcols, vals.size() - n_a);
    check_monotone(row_ptr, 0, n_csr, "row_ptr");
    for (index_t i = 0; i < row_ptr[row_ptr.n - 1]; ++i)
      if (cp[n_pcols + i] < 0 || cp[n_pcols + i] >= C) bad_plan("csr column out of range");
  } else {
    if (mr != mr_run) bad_plan("it was packed for panel height " + std::to_string(mr) + ", this CPU's kernels use " +
                               std::to_string(mr_run));
    if (panel_begin.n != P2 + 1 || zero_begin.n != P2 + 1) bad_plan("panel_begin / zero_begin need p*p + 1 entries");
    const index_t n_panels = panel_begin[P2];
    check_monotone(panel_begin, 0, INT64_MAX, "panel_begin");
    check_range(panel_xi, n_panels, 0, P2, "panel_xi");
    for (index_t xi = 0; xi < P2; ++xi)
      for (index_t q = panel_begin[xi]; q < panel_begin[xi + 1]; ++q)
        if (panel_xi[q] != xi) bad_plan("panel_xi disagrees with panel_begin");
    if (panel_row_begin.n < n_panels + 1 || panel_col_begin.n < n_panels + 1 || panel_a_begin.n < n_panels + 1)
      bad_plan("panel offsets are too short");
    check_monotone(panel_row_begin, 0, std::min<index_t>(panel_rows.n, acc.size()), "panel_row_begin");
    check_monotone(panel_col_begin, 0, n_pcols, "panel_col_begin");
    check_monotone(panel_a_begin, 0, n_a, "panel_a_begin");
    const int third = std::max(mr / 3, 1);
    for (index_t q = 0; q < n_panels; ++q) {
      const index_t rh = panel_row_begin[q + 1] - panel_row_begin[q];
      if (rh != mr && rh != 2 * third && rh != third) bad_plan("a panel has an unsupported height");
      if (panel_a_begin[q + 1] - panel_a_begin[q] != rh * (panel_col_begin[q + 1] - panel_col_begin[q]))
        bad_plan("a panel's weights do not match its rows and columns");
    }
    const index_t n_rows = panel_row_begin[n_panels];
    check_range(panel_rows, n_rows, 0, K + 1, "panel_rows");
    for (index_t i = 0; i < panel_col_begin[n_panels]; ++i)
      if (cp[i] < 0 || cp[i] >= C) bad_plan("panel column out of range");
    if (h[f_items] < 0 || item_begin.n != h[f_items] + 1) bad_plan("item_begin must have n_items + 1 entries");
    check_monotone(item_begin, 0, n_panels, "item_begin");
    check_monotone(zero_begin, 0, zero_rows.n, "zero_begin");
    check_range(zero_rows, zero_begin[P2], 0, K, "zero_rows");
  }
  return {p, m, K, C, mr, csr, panel_begin.p, panel_xi.p, panel_row_begin.p, panel_rows.p, acc.data(), h[f_items],
          item_begin.p, panel_col_begin.p, panel_a_begin.p, cp, vp, zero_begin.p, zero_rows.p, row_ptr.p,
          cp + n_pcols, vp + n_a, bias, act};
}


// The kernels of the widest supported ISA whose panel height is mr (any ISA for CSR plans).
const winoprune::KernelTable& table_for_mr(int mr, bool csr) {
  const auto best = winoprune::detect_isa();
  if (csr || winoprune::kernel_table(best).mr == mr) return winoprune::kernel_table(best);
  for (auto isa : {winoprune::Isa::avx512, winoprune::Isa::avx2, winoprune::Isa::generic})
    if (static_cast<int>(isa) <= static_cast<int>(best) && winoprune::isa_supported(isa) &&
        winoprune::kernel_table(isa).mr == mr)
      return winoprune::kernel_table(isa);
  return winoprune::kernel_table(best);  // winograd_view then names the mismatch
}

// winograd_run's work; `stages` (nullable) receives the thread-seconds of each stage.
void run_plan(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& cols_obj,
              const py::handle& vals_obj, const py::handle& acc_obj, const py::object& bias_obj, int act,
              index_t pad_top, index_t pad_left, const py::handle& out_obj, int threads,
              winoprune::StageSeconds* stages) {
  auto x = as_array<float>(x_obj, "x");
  auto out = as_array<float>(out_obj, "out", true);
  auto meta = as_array<index_t>(meta_obj, "meta");
  auto cols = as_array<std::int32_t>(cols_obj, "cols");
  auto vals = as_array<float>(vals_obj, "vals");
  auto acc = as_array<std::uint8_t>(acc_obj, "acc");
  carray<float> b;
  index_t n_bias = 0;
  const float* bias = optional_bias(bias_obj, b, n_bias);
  if (meta.size() < kWinoHeader) bad_plan("meta is too short");
  const auto& table = table_for_mr(static_cast<int>(meta.data()[f_mr]), meta.data()[f_csr] != 0);
  const auto view = winograd_view(meta, cols, vals, acc, bias, n_bias, act, table.mr);
  expect_ndim(x, 4, "x");
  expect_ndim(out, 4, "out");
  if (x.shape(1) != view.C)
    throw py::value_error("x must have " + std::to_string(view.C) + " channels, got shape " + shape_str(x));
  expect_shape(out, {x.shape(0), view.K, out.shape(2), out.shape(3)}, "out");
  if (x.shape(0) == 0) return;  // an empty batch: nothing to compute, like F.conv2d
  if (x.shape(2) < 1 || x.shape(3) < 1) throw py::value_error("x must have a non-empty spatial size");
  check_conv_geometry(x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2), out.shape(3), 3, 3, 1, 1);
  const winoprune::ConvGeometry g{x.shape(0), x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2), out.shape(3)};
  const int nt = resolve_threads(threads);
  const index_t need = table.winograd_workspace(view, g, nt);
  if (static_cast<index_t>(tls_workspace.size()) < need) tls_workspace.resize(static_cast<std::size_t>(need));
  float* wp = tls_workspace.data();
  const float* xp = x.data();
  float* yp = out.mutable_data();
  py::gil_scoped_release release;
  table.winograd_forward(view, g, xp, yp, wp, need, nt, stages);
}

void winograd_run(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& cols_obj,
                  const py::handle& vals_obj, const py::handle& acc_obj, const py::object& bias_obj, int act,
                  index_t pad_top, index_t pad_left, const py::handle& out_obj, int threads) {
  run_plan(x_obj, meta_obj, cols_obj, vals_obj, acc_obj, bias_obj, act, pad_top, pad_left, out_obj, threads, nullptr);
}

// winograd_run, and the thread-seconds each stage of the tile blocks took: {"input", "gemm", "output"}.
py::dict winograd_profile(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& cols_obj,
                          const py::handle& vals_obj, const py::handle& acc_obj, const py::object& bias_obj, int act,
                          index_t pad_top, index_t pad_left, const py::handle& out_obj, int threads) {
  winoprune::StageSeconds st;
  run_plan(x_obj, meta_obj, cols_obj, vals_obj, acc_obj, bias_obj, act, pad_top, pad_left, out_obj, threads, &st);
  return stage_dict(st);
}

// The FMA peak of the ISA the kernels dispatch to (see KernelTable::fma_peak_gflops).
double fma_peak_gflops(int threads, index_t iters) {
  if (iters < 1) throw py::value_error("iters must be a positive int, got " + std::to_string(iters));
  const int nt = resolve_threads(threads);
  const auto& table = winoprune::kernel_table(winoprune::detect_isa());
  py::gil_scoped_release release;
  return table.fma_peak_gflops(nt, iters);
}

// What Python may know about a plan, read from its meta (validated header, named fields).
struct WinogradPlanInfo {
  int p, m, mr;
  index_t K, C;
  bool csr;
  std::string isa;
  index_t n_items, kept, work;
  bool balanced;  // every Winograd position has the same number of panels (one equal-shape batched GEMM)
};

WinogradPlanInfo winograd_plan_info(const py::handle& meta_obj) {
  auto meta = as_array<index_t>(meta_obj, "meta");
  const index_t* h = meta.data();
  if (meta.size() < kWinoHeader + n_segments || h[f_format] != kWinoFormat) bad_plan("meta has an unknown format");
  if (h[f_isa] < 0 || h[f_isa] > static_cast<index_t>(winoprune::Isa::avx512)) bad_plan("meta names an unknown ISA");
  const int p = static_cast<int>(h[f_p]);
  const index_t b = h[f_segments + s_panel_begin], e = h[f_segments + s_panel_begin + 1];
  if (b < kWinoHeader || e < b || e > meta.size()) bad_plan("meta's segment offsets are out of range");
  bool balanced = h[f_csr] == 0 && e - b == static_cast<index_t>(p) * p + 1;
  for (index_t xi = 1; balanced && xi + 1 < e - b; ++xi)
    balanced = h[b + xi + 1] - h[b + xi] == h[b + 1] - h[b];
  return {p, static_cast<int>(h[f_m]), static_cast<int>(h[f_mr]), h[f_K], h[f_C], h[f_csr] != 0,
          isa_name(static_cast<winoprune::Isa>(h[f_isa])), h[f_items], h[f_kept], h[f_work], balanced};
}

}  // namespace

void bind_winograd(py::module_& mod) {
  py::class_<WinogradPlanInfo>(mod, "WinogradPlanInfo", "What a packed Winograd plan's meta array holds.")
      .def_readonly("p", &WinogradPlanInfo::p)
      .def_readonly("m", &WinogradPlanInfo::m)
      .def_readonly("mr", &WinogradPlanInfo::mr, "Panel height the weights were packed with.")
      .def_readonly("K", &WinogradPlanInfo::K)
      .def_readonly("C", &WinogradPlanInfo::C)
      .def_readonly("csr", &WinogradPlanInfo::csr)
      .def_readonly("isa", &WinogradPlanInfo::isa, "The ISA the plan was packed for.")
      .def_readonly("n_items", &WinogradPlanInfo::n_items)
      .def_readonly("kept", &WinogradPlanInfo::kept, "Kept weights.")
      .def_readonly("work", &WinogradPlanInfo::work, "Multiply-adds per tile actually run (panel padding included).")
      .def_readonly("balanced", &WinogradPlanInfo::balanced, "Every Winograd position has as many panels.");
  mod.def("pack_winograd", &pack_winograd, py::arg("U"), py::arg("mask"), py::arg("m"), py::arg("bias") = py::none(),
          py::arg("csr") = false,
          "Pack U (p*p, K, C) float32 and its bool mask into panels (or CSR rows when csr=True) for this CPU's ISA; "
          "returns the plan as (meta int64, cols int32, vals float32, acc uint8) arrays for winograd_run.");
  mod.def("winograd_plan_info", &winograd_plan_info, py::arg("meta"), "The named fields of a plan's meta array.");
  mod.def("winograd_run", &winograd_run, py::arg("x"), py::arg("meta"), py::arg("cols"), py::arg("vals"),
          py::arg("acc"), py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1,
          "Winograd conv of x into out from a plan's arrays (validated), with a fused activation; thread-safe.");
  mod.def("winograd_profile", &winograd_profile, py::arg("x"), py::arg("meta"), py::arg("cols"), py::arg("vals"),
          py::arg("acc"), py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1,
          "winograd_run, timing each stage of the tile blocks: {'input', 'gemm', 'output'} thread-seconds (summed "
          "over the threads; threads sharing a block count each stage's wait for the slowest).");
  mod.def("fma_peak_gflops", &fma_peak_gflops, py::arg("threads") = -1, py::arg("iters") = 4000000,
          "Multiply-add peak (GFLOP/s) of the dispatched ISA's vectors on `threads` threads, measured with "
          "independent FMA chains in registers.");
}

}  // namespace winoprune_py
