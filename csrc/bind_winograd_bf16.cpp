// Bindings of the bfloat16 Winograd inference conv (winograd_bf16.h, winograd_bf16_kernels.h).
//
// As for the float32 plan (bind_winograd.cpp), a packed plan crosses into Python as plain arrays that a deployed
// layer keeps in buffers, and they are validated on every call before a kernel reads them.
// meta (int64): a header of kBf16Header entries named by Bf16Field, then the index segments in the order of
// Bf16Segment, whose offsets into meta sit at [f_segments, f_segments + n_segments]. chunks (int32): the kept
// 32-channel chunks of every panel. A (uint16): the bfloat16 bits of the weights, 16 x 32 per (panel, kept chunk).
#include "bind_common.h"
#include "winograd_bf16.h"

namespace winoprune_py {
namespace {

constexpr index_t kBf16Format = 1, kBf16Header = 16;
enum Bf16Field : index_t { f_format = 0, f_p = 1, f_m = 2, f_K = 3, f_C = 4, f_panels = 5, f_kept = 6, f_work = 7,
                           f_segments = 8 };
enum Bf16Segment : index_t { s_panel_xi, s_panel_rows, s_chunk_begin, s_row_map, n_segments };
static_assert(f_segments + n_segments < kBf16Header, "the segment offsets must fit in the header");

using winoprune::Bf16Path;
using winoprune::kBf16Chunk;
using winoprune::kBf16Rows;

thread_local std::vector<float> tls_workspace;  // per calling thread: concurrent calls never share scratch memory

const char* path_name(Bf16Path path) {
  switch (path) {
    case Bf16Path::amx: return "amx";
    case Bf16Path::avx512bf16: return "avx512bf16";
    default: return "none";
  }
}

py::list supported_paths() {
  py::list out;
  for (auto path : {Bf16Path::avx512bf16, Bf16Path::amx})
    if (winoprune::bf16_supported(path) && winoprune::isa_supported(winoprune::Isa::avx512)) out.append(path_name(path));
  return out;
}

Bf16Path parse_path(const py::object& obj) {
  if (obj.is_none()) {
    const Bf16Path best = winoprune::detect_bf16();
    if (best == Bf16Path::none)
      throw py::value_error("this CPU has no bfloat16 kernels: they need AVX512-BF16 (Zen 4 and newer, Intel Xeon "
                            "since Cooper Lake) or AMX-BF16 (Intel Xeon since Sapphire Rapids), and WINOPRUNE_BF16 "
                            "must not be 'none'");
    return best;
  }
  const std::string name = py::str(obj);
  for (auto path : {Bf16Path::avx512bf16, Bf16Path::amx})
    if (name == path_name(path)) {
      if (!winoprune::bf16_supported(path))
        throw py::value_error("path='" + name + "' is not supported by this CPU; supported: " +
                              std::string(py::str(supported_paths())));
      return path;
    }
  throw py::value_error("path='" + name + "' is not valid; valid values are ['avx512bf16', 'amx'] or None (the best)");
}

py::tuple plan_arrays(const winoprune::WinogradBf16Plan& pl) {
  const std::vector<const std::vector<index_t>*> segs = {&pl.panel_xi, &pl.panel_rows, &pl.chunk_begin, &pl.row_map};
  std::vector<index_t> meta(kBf16Header, 0);
  meta[f_format] = kBf16Format;
  meta[f_p] = pl.p;
  meta[f_m] = pl.m;
  meta[f_K] = pl.K;
  meta[f_C] = pl.C;
  meta[f_panels] = pl.n_panels();
  meta[f_kept] = pl.kept;
  meta[f_work] = pl.work;
  for (index_t s = 0; s < n_segments; ++s) {
    meta[f_segments + s] = static_cast<index_t>(meta.size());
    meta.insert(meta.end(), segs[s]->begin(), segs[s]->end());
  }
  meta[f_segments + n_segments] = static_cast<index_t>(meta.size());
  return py::make_tuple(to_numpy(meta), to_numpy(pl.chunks), to_numpy(pl.A));
}

// U (p*p, K, C) and its mask packed for the bfloat16 kernels, as (meta, chunks, A).
py::tuple pack_winograd_bf16(const py::handle& U_obj, const py::handle& mask_obj, int m) {
  auto U = as_array<float>(U_obj, "U");
  auto mask = as_array<bool>(mask_obj, "mask");
  check_winograd_weights(U, mask, m);
  const float* up = U.data();
  const bool* mp = mask.data();
  winoprune::WinogradBf16Plan plan;
  {
    py::gil_scoped_release release;
    plan = winoprune::pack_winograd_bf16(up, mp, m, U.shape(1), U.shape(2), nullptr);
  }
  return plan_arrays(plan);
}

void check_panels(const Seg& panel_xi, const Seg& panel_rows, const Seg& chunk_begin, const Seg& row_map,
                  index_t n_panels, index_t P2, index_t K, index_t C, const carray<std::int32_t>& chunks,
                  index_t n_a) {
  if (panel_xi.n < n_panels || panel_rows.n < n_panels * kBf16Rows || chunk_begin.n != n_panels + 1 ||
      row_map.n != P2 * K)
    bad_plan("a segment has the wrong length");
  check_range(panel_xi, n_panels, 0, P2, "panel_xi");
  check_range(panel_rows, n_panels * kBf16Rows, 0, K + 1, "panel_rows");
  check_monotone(chunk_begin, 0, chunks.size(), "chunk_begin");
  if (n_a < chunk_begin[n_panels] * kBf16Rows * kBf16Chunk) bad_plan("A is shorter than its chunks need");
  const index_t n_chunks = (C + kBf16Chunk - 1) / kBf16Chunk;
  for (index_t i = 0; i < chunk_begin[n_panels]; ++i)
    if (chunks.data()[i] < 0 || chunks.data()[i] >= n_chunks) bad_plan("a chunk index is out of range");
  for (index_t xi = 0; xi < P2; ++xi)
    for (index_t k = 0; k < K; ++k) {
      const index_t r = row_map[xi * K + k];
      if (r < -1 || r >= n_panels * kBf16Rows) bad_plan("row_map holds a row out of range");
      if (r >= 0 && (panel_rows[r] != k || panel_xi[r / kBf16Rows] != xi))
        bad_plan("row_map disagrees with panel_rows / panel_xi");
    }
}

winoprune::WinogradBf16View bf16_view(const carray<index_t>& meta, const carray<std::int32_t>& chunks,
                                      const carray<std::uint16_t>& A, const float* bias, index_t n_bias, int act) {
  const index_t nm = meta.size();
  const index_t* h = meta.data();
  if (nm < kBf16Header + n_segments || h[f_format] != kBf16Format) bad_plan("meta has an unknown format");
  const int p = static_cast<int>(h[f_p]), m = static_cast<int>(h[f_m]);
  const index_t K = h[f_K], C = h[f_C], n_panels = h[f_panels];
  if (!((p == 4 && m == 2) || (p == 6 && m == 4))) bad_plan("p, m must be (4, 2) or (6, 4)");
  if (K < 1 || C < 1 || C > INT32_MAX || n_panels < 0) bad_plan("bad K, C or panel count");
  check_activation(act);
  if (bias && n_bias != K) throw py::value_error("bias must have shape (" + std::to_string(K) + ",)");
  Seg seg[n_segments];
  for (index_t s = 0; s < n_segments; ++s) {
    const index_t b = h[f_segments + s], e = h[f_segments + s + 1];
    if (b < kBf16Header || e < b || e > nm) bad_plan("meta's segment offsets are out of range");
    seg[s] = {h + b, e - b};
  }
  if (h[f_segments + n_segments] != nm) bad_plan("meta's last offset must be its length");
  const index_t P2 = static_cast<index_t>(p) * p;
  check_panels(seg[s_panel_xi], seg[s_panel_rows], seg[s_chunk_begin], seg[s_row_map], n_panels, P2, K, C, chunks,
               A.size());
  return {p, m, K, C, n_panels, seg[s_panel_xi].p, seg[s_panel_rows].p, seg[s_chunk_begin].p, chunks.data(),
          A.data(), seg[s_row_map].p, bias, act};
}

// The activations of one call: float32 NCHW (N, C, H, W), or bfloat16 bits NHWC (N, H, W, C) as uint16.
struct Activations {
  py::array x, out;
  bool nhwc;
  index_t N, C, H, W, K, Ho, Wo;
};

Activations activations(const py::handle& x_obj, const py::handle& out_obj) {
  const bool nhwc = py::isinstance<py::array>(x_obj) &&
                    py::reinterpret_borrow<py::array>(x_obj).dtype().is(py::dtype::of<std::uint16_t>());
  Activations a{};
  a.nhwc = nhwc;
  if (nhwc) {
    auto x = as_array<std::uint16_t>(x_obj, "x");
    auto out = as_array<std::uint16_t>(out_obj, "out", true);
    expect_ndim(x, 4, "x");
    expect_ndim(out, 4, "out");
    a = {x, out, true, x.shape(0), x.shape(3), x.shape(1), x.shape(2), out.shape(3), out.shape(1), out.shape(2)};
    if (out.shape(0) != a.N) throw py::value_error("out must have x's batch size, got shape " + shape_str(out));
    if (2 * std::max(x.size(), out.size()) >= INT32_MAX)
      throw py::value_error("an NHWC bfloat16 tensor over 2 GiB is too large for the kernel");
  } else {
    auto x = as_array<float>(x_obj, "x");
    auto out = as_array<float>(out_obj, "out", true);
    expect_ndim(x, 4, "x");
    expect_ndim(out, 4, "out");
    a = {x, out, false, x.shape(0), x.shape(1), x.shape(2), x.shape(3), out.shape(1), out.shape(2), out.shape(3)};
    expect_shape(out, {a.N, a.K, a.Ho, a.Wo}, "out");
  }
  return a;
}

// x / out: float32 NCHW, or bfloat16 bits (uint16) NHWC.
void run_plan(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& chunks_obj,
              const py::handle& A_obj, const py::object& bias_obj, int act, index_t pad_top, index_t pad_left,
              const py::handle& out_obj, int threads, const py::object& path_obj, winoprune::StageSeconds* stages) {
  Activations io = activations(x_obj, out_obj);
  auto meta = as_array<index_t>(meta_obj, "meta");
  auto chunks = as_array<std::int32_t>(chunks_obj, "chunks");
  auto A = as_array<std::uint16_t>(A_obj, "A");
  carray<float> b;
  index_t n_bias = 0;
  const float* bias = optional_bias(bias_obj, b, n_bias);
  const Bf16Path path = parse_path(path_obj);
  const auto view = bf16_view(meta, chunks, A, bias, n_bias, act);
  if (io.C != view.C)
    throw py::value_error("x must have " + std::to_string(view.C) + " channels, got shape " + shape_str(io.x));
  if (io.K != view.K)
    throw py::value_error("out must have " + std::to_string(view.K) + " channels, got shape " + shape_str(io.out));
  if (io.N == 0) return;
  if (io.H < 1 || io.W < 1) throw py::value_error("x must have a non-empty spatial size");
  check_conv_geometry(io.H, io.W, pad_top, pad_left, io.Ho, io.Wo, 3, 3, 1, 1);
  const winoprune::ConvGeometry g{io.N, io.H, io.W, pad_top, pad_left, io.Ho, io.Wo};
  const auto& table = winoprune::kernel_table(winoprune::Isa::avx512);
  const int nt = resolve_threads(threads);
  const index_t need = table.winograd_bf16_workspace(view, g, nt);
  if (static_cast<index_t>(tls_workspace.size()) < need) tls_workspace.resize(static_cast<std::size_t>(need));
  float* wp = tls_workspace.data();
  const void* xp = io.x.data();
  void* yp = io.out.mutable_data();
  py::gil_scoped_release release;
  table.winograd_bf16_forward(view, g, xp, yp, io.nhwc, wp, need, nt, path, stages);
}

void winograd_bf16_run(const py::handle& x, const py::handle& meta, const py::handle& chunks, const py::handle& A,
                       const py::object& bias, int act, index_t pad_top, index_t pad_left, const py::handle& out,
                       int threads, const py::object& path) {
  run_plan(x, meta, chunks, A, bias, act, pad_top, pad_left, out, threads, path, nullptr);
}

py::dict winograd_bf16_profile(const py::handle& x, const py::handle& meta, const py::handle& chunks,
                               const py::handle& A, const py::object& bias, int act, index_t pad_top,
                               index_t pad_left, const py::handle& out, int threads, const py::object& path) {
  winoprune::StageSeconds st;
  run_plan(x, meta, chunks, A, bias, act, pad_top, pad_left, out, threads, path, &st);
  return stage_dict(st);
}

struct Bf16PlanInfo {
  int p, m;
  index_t K, C, n_panels, kept, work;
};

Bf16PlanInfo winograd_bf16_plan_info(const py::handle& meta_obj) {
  auto meta = as_array<index_t>(meta_obj, "meta");
  const index_t* h = meta.data();
  if (meta.size() < kBf16Header + n_segments || h[f_format] != kBf16Format) bad_plan("meta has an unknown format");
  return {static_cast<int>(h[f_p]), static_cast<int>(h[f_m]), h[f_K], h[f_C], h[f_panels], h[f_kept], h[f_work]};
}

}  // namespace

void bind_winograd_bf16(py::module_& mod) {
  py::class_<Bf16PlanInfo>(mod, "WinogradBf16PlanInfo", "What a packed bfloat16 Winograd plan's meta array holds.")
      .def_readonly("p", &Bf16PlanInfo::p)
      .def_readonly("m", &Bf16PlanInfo::m)
      .def_readonly("K", &Bf16PlanInfo::K)
      .def_readonly("C", &Bf16PlanInfo::C)
      .def_readonly("n_panels", &Bf16PlanInfo::n_panels, "Panels of 16 output rows.")
      .def_readonly("kept", &Bf16PlanInfo::kept, "Kept weights.")
      .def_readonly("work", &Bf16PlanInfo::work, "Multiply-adds per tile actually run (tile padding included).");
  mod.def("bf16_path", [] { return path_name(winoprune::detect_bf16()); },
          "The bfloat16 path the kernels dispatch to: 'amx', 'avx512bf16' or 'none' (capped by $WINOPRUNE_BF16).");
  mod.def("supported_bf16_paths", &supported_paths, "bfloat16 paths this CPU (and OS) can run.");
  mod.def("pack_winograd_bf16", &pack_winograd_bf16, py::arg("U"), py::arg("mask"), py::arg("m"),
          "Pack U (p*p, K, C) float32 and its bool mask into 16 x 32 bfloat16 tiles; returns the plan as "
          "(meta int64, chunks int32, A uint16) arrays for winograd_bf16_run.");
  mod.def("winograd_bf16_plan_info", &winograd_bf16_plan_info, py::arg("meta"),
          "The named fields of a bfloat16 plan's meta array.");
  mod.def("winograd_bf16_run", &winograd_bf16_run, py::arg("x"), py::arg("meta"), py::arg("chunks"), py::arg("A"),
          py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1, py::arg("path") = py::none(),
          "Winograd conv of x into out with a bfloat16 multiply (float32 sums) from a plan's arrays (validated): "
          "float32 NCHW tensors, or bfloat16 bits (uint16) NHWC ones; path: 'amx', 'avx512bf16' or None (the best "
          "this CPU has). Thread-safe.");
  mod.def("winograd_bf16_profile", &winograd_bf16_profile, py::arg("x"), py::arg("meta"), py::arg("chunks"),
          py::arg("A"), py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1, py::arg("path") = py::none(),
          "winograd_bf16_run, timing each stage: {'input', 'gemm', 'output'} thread-seconds.");
}

}  // namespace winoprune_py
