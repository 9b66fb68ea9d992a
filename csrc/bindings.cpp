// pybind11 bindings of the lightning_winoprune native kernels (module lightning_winoprune._C).
// The kernels themselves are torch-free and live in the headers; this file only validates and dispatches.
// Arrays must be C-contiguous float32 (float64 for the filter transform's G): anything else is a TypeError,
// inconsistent shapes are a ValueError. Nothing is ever converted or copied implicitly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "filter_transform.h"
#include "isa.h"
#include "winograd_conv.h"
#include "winograd_tiles.h"

namespace py = pybind11;
using winoprune::index_t;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

const char* isa_name(winoprune::Isa isa) {
  switch (isa) {
    case winoprune::Isa::avx512: return "avx512";
    case winoprune::Isa::avx2: return "avx2";
    default: return "generic";
  }
}

py::list supported_isas() {
  py::list out;
  for (auto isa : {winoprune::Isa::generic, winoprune::Isa::avx2, winoprune::Isa::avx512})
    if (winoprune::isa_supported(isa)) out.append(isa_name(isa));
  return out;
}

// Type checks happen before pybind's own conversion so that the message names the argument.
template <typename T>
carray<T> as_array(const py::handle& obj, const char* name, bool writable = false) {
  const char* want = std::is_same<T, float>::value           ? "float32"
                     : std::is_same<T, bool>::value          ? "bool"
                     : std::is_same<T, std::int64_t>::value  ? "int64"
                     : std::is_same<T, std::int32_t>::value  ? "int32"
                     : std::is_same<T, std::uint8_t>::value  ? "uint8"
                                                             : "float64";
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array of " + want + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + want + ", got " +
                         std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + " must be C-contiguous");
  if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
  return py::reinterpret_borrow<carray<T>>(obj);
}

void expect_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
}

void expect_shape(const py::array& a, std::initializer_list<index_t> shape, const char* name) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t i = 0;
  std::ostringstream want;
  want << "(";
  for (index_t s : shape) {
    if (ok && a.shape(i) != s) ok = false;
    want << (i ? ", " : "") << s;
    ++i;
  }
  want << (shape.size() == 1 ? ",)" : ")");
  if (!ok) throw py::value_error(std::string(name) + " must have shape " + want.str() + ", got " + shape_str(a));
}

int tile_p_from(const py::array& mat, const char* name) {
  const index_t p = mat.shape(mat.ndim() - 1);
  if (p != 4 && p != 6 && p != 8)
    throw py::value_error(std::string(name) + " must have p = m + 2 in {4, 6, 8} columns, got shape " +
                          shape_str(mat));
  return static_cast<int>(p);
}

void check_tiles(index_t pad_top, index_t pad_left, index_t th, index_t tw) {
  if (pad_top < 0 || pad_left < 0)
    throw py::value_error("padding must be >= 0, got (" + std::to_string(pad_top) + ", " + std::to_string(pad_left) +
                          ")");
  if (th < 1 || tw < 1)
    throw py::value_error("tile counts must be >= 1, got (" + std::to_string(th) + ", " + std::to_string(tw) + ")");
}

// Validates BT (p, p), the padding and tile counts, and the NCHW tensor on the spatial side; sets p.
winoprune::TileGeometry input_geometry(const py::array& nchw, const char* name, const py::array& BT, index_t pad_top,
                                       index_t pad_left, index_t th, index_t tw, int& p) {
  expect_ndim(nchw, 4, name);
  expect_ndim(BT, 2, "BT");
  p = tile_p_from(BT, "BT");
  expect_shape(BT, {p, p}, "BT");
  check_tiles(pad_top, pad_left, th, tw);
  return {nchw.shape(0), nchw.shape(1), nchw.shape(2), nchw.shape(3), pad_top, pad_left, th, tw};
}

winoprune::Isa parse_isa(const py::object& isa);

// The vector training transforms of an ISA, when its compile-time matrix (BT or AT) equals the one passed in.
const winoprune::KernelTable* train_table(const py::object& isa, const float* (*mat)(const winoprune::KernelTable&, int),
                                          const float* given, int p, int n) {
  const winoprune::KernelTable& tab = winoprune::kernel_table(parse_isa(isa));
  const float* fixed = mat(tab, p);
  if (fixed == nullptr) return nullptr;
  for (int i = 0; i < n; ++i)
    if (fixed[i] != given[i]) return nullptr;
  return &tab;
}
const float* table_BT(const winoprune::KernelTable& t, int p) { return t.train_BT(p); }
const float* table_AT(const winoprune::KernelTable& t, int p) { return t.train_AT(p); }

void filter_transform(const py::handle& g_obj, const py::handle& G_obj, const py::handle& out_obj) {
  auto g = as_array<float>(g_obj, "g");
  auto G = as_array<double>(G_obj, "G");
  auto out = as_array<float>(out_obj, "out", true);
  expect_ndim(G, 2, "G");
  const index_t p = G.shape(0);
  if (p != 4 && p != 6 && p != 8)
    throw py::value_error("G must be (p, 3) with p = m + 2 in {4, 6, 8}, got shape " + shape_str(G));
  expect_shape(G, {p, 3}, "G");
  if (g.ndim() < 2 || g.shape(g.ndim() - 1) != 3 || g.shape(g.ndim() - 2) != 3)
    throw py::value_error("g must end in (3, 3), got shape " + shape_str(g));
  bool same_lead = out.ndim() == g.ndim() && out.shape(out.ndim() - 1) == p && out.shape(out.ndim() - 2) == p;
  for (py::ssize_t i = 0; same_lead && i + 2 < g.ndim(); ++i) same_lead = g.shape(i) == out.shape(i);
  if (!same_lead)
    throw py::value_error("out must have g's shape " + shape_str(g) + " with the last two dimensions (" +
                          std::to_string(p) + ", " + std::to_string(p) + "), got " + shape_str(out));
  const index_t n_filters = g.size() / 9;
  const float* gp = g.data();
  const double* Gp = G.data();
  float* up = out.mutable_data();
  py::gil_scoped_release release;
  winoprune::filter_transform(gp, n_filters, Gp, static_cast<int>(p), up);
}

void input_transform(const py::handle& x_obj, const py::handle& BT_obj, index_t pad_top, index_t pad_left,
                     index_t th, index_t tw, const py::handle& out_obj, const py::object& isa) {
  auto x = as_array<float>(x_obj, "x");
  auto BT = as_array<float>(BT_obj, "BT");
  auto out = as_array<float>(out_obj, "out", true);
  int p = 0;
  const auto g = input_geometry(x, "x", BT, pad_top, pad_left, th, tw, p);
  expect_shape(out, {p * p, g.C, g.N * th * tw}, "out");
  const float* xp = x.data();
  const float* bp = BT.data();
  float* vp = out.mutable_data();
  const auto* tab = train_table(isa, table_BT, bp, p, p * p);
  py::gil_scoped_release release;
  if (tab && tab->train_input(xp, g, p, vp, winoprune::max_threads())) return;
  winoprune::input_transform(xp, g, bp, p, vp);
}

void input_transform_adjoint(const py::handle& dV_obj, const py::handle& BT_obj, index_t pad_top, index_t pad_left,
                             index_t th, index_t tw, const py::handle& out_obj, const py::object& isa) {
  auto dV = as_array<float>(dV_obj, "dV");
  auto BT = as_array<float>(BT_obj, "BT");
  auto out = as_array<float>(out_obj, "out", true);
  int p = 0;
  const auto g = input_geometry(out, "out", BT, pad_top, pad_left, th, tw, p);
  expect_shape(dV, {p * p, g.C, g.N * th * tw}, "dV");
  const float* vp = dV.data();
  const float* bp = BT.data();
  float* xp = out.mutable_data();
  const auto* tab = train_table(isa, table_BT, bp, p, p * p);
  py::gil_scoped_release release;
  if (tab && tab->train_input_adjoint(vp, g, p, xp, winoprune::max_threads())) return;
  winoprune::input_transform_adjoint(vp, g, bp, p, xp);
}

// The optional row map of output_transform / its adjoint (see tile_row in isa.h): int64 (P2, K), every entry in
// [-1, R) for M / dM of R rows; with `distinct` (the adjoint writes through it) no row may appear twice. Returns its
// data (nullptr when rows_obj is None) and fills `used` (R flags) when given.
const std::int64_t* row_map(const py::object& rows_obj, carray<std::int64_t>& holder, index_t p2, index_t K,
                            index_t R, bool distinct, std::vector<char>* used) {
  if (rows_obj.is_none()) return nullptr;
  holder = as_array<std::int64_t>(rows_obj, "rows");
  expect_shape(holder, {p2, K}, "rows");
  std::vector<char> seen(distinct || used ? static_cast<std::size_t>(R) : 0, 0);
  const std::int64_t* r = holder.data();
  for (index_t i = 0; i < p2 * K; ++i) {
    if (r[i] < -1 || r[i] >= R)
      throw py::value_error("rows[" + std::to_string(i / K) + ", " + std::to_string(i % K) + "] = " +
                            std::to_string(r[i]) + " is outside [-1, " + std::to_string(R) + ")");
    if (r[i] < 0 || seen.empty()) continue;
    if (distinct && seen[r[i]])
      throw py::value_error("rows maps row " + std::to_string(r[i]) + " twice (each row may be written once)");
    seen[r[i]] = 1;
  }
  if (used) *used = std::move(seen);
  return r;
}

void output_transform(const py::handle& M_obj, const py::handle& AT_obj, const py::object& bias_obj, index_t th,
                      index_t tw, const py::handle& out_obj, const py::object& isa, const py::object& rows_obj) {
  auto M = as_array<float>(M_obj, "M");
  auto AT = as_array<float>(AT_obj, "AT");
  auto out = as_array<float>(out_obj, "out", true);
  expect_ndim(out, 4, "out");
  expect_ndim(AT, 2, "AT");
  const int p = tile_p_from(AT, "AT");
  expect_shape(AT, {p - 2, p}, "AT");
  check_tiles(0, 0, th, tw);
  winoprune::TileGeometry g{out.shape(0), out.shape(1), out.shape(2), out.shape(3), 0, 0, th, tw};
  if (g.H > th * (p - 2) || g.W > tw * (p - 2))
    throw py::value_error("out's spatial size " + shape_str(out) + " does not fit in " + std::to_string(th) + " x " +
                          std::to_string(tw) + " tiles of " + std::to_string(p - 2));
  carray<std::int64_t> rows_arr;
  const std::int64_t* rows = nullptr;
  if (rows_obj.is_none()) {
    expect_shape(M, {p * p, g.C, g.N * th * tw}, "M");
  } else {
    expect_ndim(M, 2, "M (with rows)");
    expect_shape(M, {M.shape(0), g.N * th * tw}, "M (with rows)");
    rows = row_map(rows_obj, rows_arr, p * p, g.C, M.shape(0), false, nullptr);
  }
  const float* bias = nullptr;
  carray<float> b;
  if (!bias_obj.is_none()) {
    b = as_array<float>(bias_obj, "bias");
    expect_shape(b, {g.C}, "bias");
    bias = b.data();
  }
  const float* mp = M.data();
  const float* ap = AT.data();
  float* yp = out.mutable_data();
  const auto* tab = train_table(isa, table_AT, ap, p, (p - 2) * p);
  py::gil_scoped_release release;
  if (tab && tab->train_output(mp, g, bias, rows, p, yp, winoprune::max_threads())) return;
  winoprune::output_transform(mp, g, ap, bias, rows, p, yp);
}

void output_transform_adjoint(const py::handle& dy_obj, const py::handle& AT_obj, index_t th, index_t tw,
                              const py::handle& out_obj, const py::object& isa, const py::object& rows_obj) {
  auto dy = as_array<float>(dy_obj, "dy");
  auto AT = as_array<float>(AT_obj, "AT");
  auto out = as_array<float>(out_obj, "out", true);
  expect_ndim(dy, 4, "dy");
  expect_ndim(AT, 2, "AT");
  const int p = tile_p_from(AT, "AT");
  expect_shape(AT, {p - 2, p}, "AT");
  check_tiles(0, 0, th, tw);
  winoprune::TileGeometry g{dy.shape(0), dy.shape(1), dy.shape(2), dy.shape(3), 0, 0, th, tw};
  if (g.H > th * (p - 2) || g.W > tw * (p - 2))
    throw py::value_error("dy's spatial size " + shape_str(dy) + " does not fit in " + std::to_string(th) + " x " +
                          std::to_string(tw) + " tiles of " + std::to_string(p - 2));
  carray<std::int64_t> rows_arr;
  const std::int64_t* rows = nullptr;
  std::vector<char> used;
  const index_t T = g.N * th * tw;
  if (rows_obj.is_none()) {
    expect_shape(out, {p * p, g.C, T}, "out");
  } else {
    expect_ndim(out, 2, "out (with rows)");
    expect_shape(out, {out.shape(0), T}, "out (with rows)");
    rows = row_map(rows_obj, rows_arr, p * p, g.C, out.shape(0), true, &used);
  }
  const float* dp = dy.data();
  const float* ap = AT.data();
  float* mp = out.mutable_data();
  const auto* tab = train_table(isa, table_AT, ap, p, (p - 2) * p);
  py::gil_scoped_release release;
  for (std::size_t r = 0; r < used.size(); ++r)  // rows no (xi, k) maps to: zero, as in the dense dM
    if (!used[r]) std::fill(mp + r * T, mp + (r + 1) * T, 0.0f);
  if (tab && tab->train_output_adjoint(dp, g, rows, p, mp, winoprune::max_threads())) return;
  winoprune::output_transform_adjoint(dp, g, ap, rows, p, mp);
}

winoprune::Isa parse_isa(const py::object& isa) {
  if (isa.is_none()) return winoprune::detect_isa();
  const std::string name = py::str(isa);
  for (auto cand : {winoprune::Isa::generic, winoprune::Isa::avx2, winoprune::Isa::avx512}) {
    if (name == isa_name(cand)) {
      if (!winoprune::isa_supported(cand))
        throw py::value_error("isa='" + name + "' is not supported by this CPU; supported: " +
                              std::string(py::str(supported_isas())));
      return cand;
    }
  }
  throw py::value_error("isa='" + name + "' is not valid; valid values are ['generic', 'avx2', 'avx512']");
}

int resolve_threads(int threads) {
  if (threads == 0 || threads < -1) throw py::value_error("threads must be >= 1 or -1 (all), got " + std::to_string(threads));
  return threads == -1 ? winoprune::max_threads() : threads;
}

// Validates padding and the output size of a conv whose input is (.., H, W) and kernel (kh, kw), stride (sh, sw).
void check_conv_geometry(index_t H, index_t W, index_t pad_top, index_t pad_left, index_t Ho, index_t Wo, index_t kh,
                         index_t kw, index_t sh, index_t sw) {
  if (pad_top < 0 || pad_left < 0)
    throw py::value_error("padding must be >= 0, got (" + std::to_string(pad_top) + ", " + std::to_string(pad_left) +
                          ")");
  if (Ho < 1 || Wo < 1) throw py::value_error("out must have a non-empty spatial size");
  // the implied bottom/right padding: a strided conv may leave up to stride-1 input rows unused (negative), and it
  // may exceed the top padding by at most the kernel size (asymmetric "same" padding)
  const index_t pad_bottom = (Ho - 1) * sh + kh - H - pad_top, pad_right = (Wo - 1) * sw + kw - W - pad_left;
  if (pad_bottom <= -sh || pad_right <= -sw || pad_bottom > pad_top + kh || pad_right > pad_left + kw)
    throw py::value_error("out's spatial size (" + std::to_string(Ho) + ", " + std::to_string(Wo) +
                          ") does not match the input (" + std::to_string(H) + ", " + std::to_string(W) +
                          ") with padding (" + std::to_string(pad_top) + ", " + std::to_string(pad_left) + ")");
}

struct PyWinogradPlan {
  winoprune::WinogradPlan plan;

  winoprune::ConvGeometry geometry(const py::array& x, index_t pad_top, index_t pad_left, index_t Ho,
                                   index_t Wo) const {
    expect_ndim(x, 4, "x");
    if (x.shape(1) != plan.C)
      throw py::value_error("x must have " + std::to_string(plan.C) + " channels, got shape " + shape_str(x));
    check_conv_geometry(x.shape(2), x.shape(3), pad_top, pad_left, Ho, Wo, 3, 3, 1, 1);
    return {x.shape(0), x.shape(2), x.shape(3), pad_top, pad_left, Ho, Wo};
  }

  index_t workspace_size(index_t N, index_t H, index_t W, index_t pad_top, index_t pad_left, index_t Ho, index_t Wo,
                         int threads) const {
    if (N < 1 || H < 1 || W < 1) throw py::value_error("N, H and W must be >= 1");
    check_conv_geometry(H, W, pad_top, pad_left, Ho, Wo, 3, 3, 1, 1);
    const winoprune::ConvGeometry g{N, H, W, pad_top, pad_left, Ho, Wo};
    return winoprune::kernel_table(plan.isa).winograd_workspace(plan.view(), g, resolve_threads(threads));
  }

  void forward(const py::handle& x_obj, index_t pad_top, index_t pad_left, const py::handle& out_obj,
               const py::handle& ws_obj, int threads) const {
    auto x = as_array<float>(x_obj, "x");
    auto out = as_array<float>(out_obj, "out", true);
    auto ws = as_array<float>(ws_obj, "workspace", true);
    expect_ndim(out, 4, "out");
    const auto g = geometry(x, pad_top, pad_left, out.shape(2), out.shape(3));
    expect_shape(out, {g.N, plan.K, g.Ho, g.Wo}, "out");
    const int nt = resolve_threads(threads);
    const auto& table = winoprune::kernel_table(plan.isa);
    const auto view = plan.view();
    const index_t need = table.winograd_workspace(view, g, nt);
    if (ws.size() < need)
      throw py::value_error("workspace must hold at least " + std::to_string(need) + " floats, got " +
                            std::to_string(ws.size()));
    const float* xp = x.data();
    float* yp = out.mutable_data();
    float* wp = ws.mutable_data();
    const index_t wn = ws.size();
    py::gil_scoped_release release;
    table.winograd_forward(view, g, xp, yp, wp, wn, nt);
  }
};

struct PyDepthwisePlan {
  winoprune::DepthwisePlan plan;

  void forward(const py::handle& x_obj, index_t pad_top, index_t pad_left, const py::handle& out_obj,
               int threads) const {
    auto x = as_array<float>(x_obj, "x");
    auto out = as_array<float>(out_obj, "out", true);
    expect_ndim(x, 4, "x");
    expect_ndim(out, 4, "out");
    if (x.shape(1) != plan.C)
      throw py::value_error("x must have " + std::to_string(plan.C) + " channels, got shape " + shape_str(x));
    check_conv_geometry(x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2), out.shape(3), plan.kh, plan.kw,
                        plan.stride_h, plan.stride_w);
    expect_shape(out, {x.shape(0), plan.C, out.shape(2), out.shape(3)}, "out");
    const winoprune::DepthwiseGeometry g{x.shape(0), x.shape(2), x.shape(3), pad_top, pad_left, out.shape(2),
                                         out.shape(3)};
    const int nt = resolve_threads(threads);
    const auto& table = winoprune::kernel_table(winoprune::detect_isa());
    const auto view = plan.view();
    const float* xp = x.data();
    float* yp = out.mutable_data();
    py::gil_scoped_release release;
    table.depthwise_forward(view, g, xp, yp, nt);
  }
};

PyWinogradPlan pack_winograd(const py::handle& U_obj, const py::handle& mask_obj, int m, const py::object& bias_obj,
                             bool csr, const py::object& isa_obj) {
  auto U = as_array<float>(U_obj, "U");
  auto mask = as_array<bool>(mask_obj, "mask");
  if (m != 2 && m != 4) throw py::value_error("m=" + std::to_string(m) + " is not valid; valid values are [2, 4]");
  const index_t P2 = static_cast<index_t>(m + 2) * (m + 2);
  expect_ndim(U, 3, "U");
  if (U.shape(0) != P2 || U.shape(1) < 1 || U.shape(2) < 1)
    throw py::value_error("U must be (p*p, K, C) = (" + std::to_string(P2) + ", K, C) with K, C >= 1, got " +
                          shape_str(U));
  expect_shape(mask, {P2, U.shape(1), U.shape(2)}, "mask");
  const float* bias = nullptr;
  carray<float> b;
  if (!bias_obj.is_none()) {
    b = as_array<float>(bias_obj, "bias");
    expect_shape(b, {U.shape(1)}, "bias");
    bias = b.data();
  }
  const auto isa = parse_isa(isa_obj);
  const int mr = winoprune::kernel_table(isa).mr;
  PyWinogradPlan out;
  const float* up = U.data();
  const bool* mp = mask.data();
  {
    py::gil_scoped_release release;
    out.plan = winoprune::pack_winograd(up, mp, m, U.shape(1), U.shape(2), bias, csr, isa, mr);
  }
  return out;
}

PyDepthwisePlan pack_depthwise(const py::handle& w_obj, const py::handle& mask_obj, int stride_h, int stride_w,
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
  PyDepthwisePlan out;
  out.plan = winoprune::pack_depthwise(w.data(), mask.data(), w.shape(0), static_cast<int>(w.shape(1)),
                                       static_cast<int>(w.shape(2)), stride_h, stride_w, bias);
  return out;
}


// ---------------------------------------------------------------------------------------------------------------
// Plans as plain arrays: what the torch custom ops (lightning_winoprune.deploy) keep in module buffers, so a deployed
// model can be deep-copied, saved, compiled and exported. A plan's arrays go out once (plan_arrays) and come back on
// every call (winograd_run / depthwise_run), where they are validated before any kernel reads them: a damaged or
// hand-made state_dict raises ValueError instead of reading out of bounds.
//
// Winograd meta (int64): a header of kWinoHeader entries, then the index segments in the order of kWinoSegments.
//   header: [0] format version, [1] p, [2] m, [3] mr, [4] K, [5] C, [6] csr, [7] isa, [8] n_items, [9] kept,
//           [10] work, [11] panel_cols length (the rest of cols is csr_cols), [12] A length (the rest of vals is
//           csr_vals), [16 .. 16 + n_segments] segment offsets into meta.
// cols (int32): panel_cols then csr_cols; vals (float32): A then csr_vals; acc (uint8): panel_row_acc.
constexpr index_t kWinoFormat = 1, kWinoHeader = 32, kWinoSegments = 10, kSegOff = 16;
// Depthwise meta (int64): [0] format version, [1] C, [2] kh, [3] kw, [4] stride_h, [5] stride_w, [6] kept taps,
// then tap_begin (C + 1). taps (int32): dy of every tap then dx; weights (float32).
constexpr index_t kDwFormat = 1, kDwHeader = 8;

thread_local std::vector<float> tls_workspace;  // per calling thread: concurrent calls never share scratch memory

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::tuple winograd_arrays(const PyWinogradPlan& self) {
  const auto& pl = self.plan;
  const std::vector<const std::vector<index_t>*> segs = {&pl.panel_begin, &pl.panel_xi, &pl.panel_row_begin,
                                                         &pl.panel_rows, &pl.item_begin, &pl.panel_col_begin,
                                                         &pl.panel_a_begin, &pl.zero_begin, &pl.zero_rows,
                                                         &pl.row_ptr};
  std::vector<index_t> meta(kWinoHeader, 0);
  meta[0] = kWinoFormat;
  meta[1] = pl.p;
  meta[2] = pl.m;
  meta[3] = pl.mr;
  meta[4] = pl.K;
  meta[5] = pl.C;
  meta[6] = pl.csr ? 1 : 0;
  meta[7] = static_cast<index_t>(pl.isa);
  meta[8] = static_cast<index_t>(pl.item_begin.empty() ? 0 : pl.item_begin.size() - 1);
  meta[9] = pl.kept;
  meta[10] = pl.work;
  meta[11] = static_cast<index_t>(pl.panel_cols.size());
  meta[12] = static_cast<index_t>(pl.A.size());
  for (index_t s = 0; s < kWinoSegments; ++s) {
    meta[kSegOff + s] = static_cast<index_t>(meta.size());
    meta.insert(meta.end(), segs[s]->begin(), segs[s]->end());
  }
  meta[kSegOff + kWinoSegments] = static_cast<index_t>(meta.size());
  std::vector<std::int32_t> cols(pl.panel_cols);
  cols.insert(cols.end(), pl.csr_cols.begin(), pl.csr_cols.end());
  std::vector<float> vals(pl.A);
  vals.insert(vals.end(), pl.csr_vals.begin(), pl.csr_vals.end());
  return py::make_tuple(to_numpy(meta), to_numpy(cols), to_numpy(vals), to_numpy(pl.panel_row_acc));
}

py::tuple depthwise_arrays(const PyDepthwisePlan& self) {
  const auto& pl = self.plan;
  std::vector<index_t> meta(kDwHeader, 0);
  meta[0] = kDwFormat;
  meta[1] = pl.C;
  meta[2] = pl.kh;
  meta[3] = pl.kw;
  meta[4] = pl.stride_h;
  meta[5] = pl.stride_w;
  meta[6] = pl.kept();
  meta.insert(meta.end(), pl.tap_begin.begin(), pl.tap_begin.end());
  std::vector<std::int32_t> taps(pl.tap_dy);
  taps.insert(taps.end(), pl.tap_dx.begin(), pl.tap_dx.end());
  return py::make_tuple(to_numpy(meta), to_numpy(taps), to_numpy(pl.tap_w));
}

[[noreturn]] void bad_plan(const std::string& what) {
  throw py::value_error("invalid packed plan: " + what + " (re-create it with lightning_winoprune.deploy)");
}

// A segment of meta: [begin, end) with a length check.
struct Seg {
  const index_t* p;
  index_t n;
  index_t operator[](index_t i) const { return p[i]; }
};

void check_monotone(const Seg& s, index_t first, index_t last_max, const char* name) {
  if (s.n < 1 || s[0] != first) bad_plan(std::string(name) + " must start at " + std::to_string(first));
  for (index_t i = 1; i < s.n; ++i)
    if (s[i] < s[i - 1]) bad_plan(std::string(name) + " must be non-decreasing");
  if (s[s.n - 1] > last_max) bad_plan(std::string(name) + " points past its array");
}

void check_range(const Seg& s, index_t count, index_t lo, index_t hi, const char* name) {
  if (count > s.n) bad_plan(std::string(name) + " is too short");
  for (index_t i = 0; i < count; ++i)
    if (s[i] < lo || s[i] >= hi) bad_plan(std::string(name) + " holds an index out of range");
}

// Validates the arrays and returns a view of them for a kernel of panel height mr_run.
winoprune::WinogradPlanView winograd_view(const carray<index_t>& meta, const carray<std::int32_t>& cols,
                                          const carray<float>& vals, const carray<std::uint8_t>& acc,
                                          const float* bias, index_t n_bias, int act, int mr_run) {
  const index_t nm = meta.size();
  const index_t* h = meta.data();
  if (nm < kWinoHeader + kWinoSegments || h[0] != kWinoFormat) bad_plan("meta has an unknown format");
  const int p = static_cast<int>(h[1]), m = static_cast<int>(h[2]), mr = static_cast<int>(h[3]);
  const index_t K = h[4], C = h[5];
  const bool csr = h[6] != 0;
  if (!((p == 4 && m == 2) || (p == 6 && m == 4))) bad_plan("p, m must be (4, 2) or (6, 4)");
  if (K < 1 || C < 1 || C > INT32_MAX || mr < 1 || mr > 64 || h[6] < 0 || h[6] > 1) bad_plan("bad K, C, mr or csr");
  if (act < 0 || act >= winoprune::n_activations) throw py::value_error("act must be in [0, 5), got " + std::to_string(act));
  if (bias && n_bias != K) throw py::value_error("bias must have shape (" + std::to_string(K) + ",)");
  const index_t P2 = static_cast<index_t>(p) * p;
  Seg seg[kWinoSegments];
  for (index_t s = 0; s < kWinoSegments; ++s) {
    const index_t b = h[kSegOff + s], e = h[kSegOff + s + 1];
    if (b < kWinoHeader || e < b || e > nm) bad_plan("meta's segment offsets are out of range");
    seg[s] = {h + b, e - b};
  }
  if (h[kSegOff + kWinoSegments] != nm) bad_plan("meta's last offset must be its length");
  const Seg &panel_begin = seg[0], &panel_xi = seg[1], &panel_row_begin = seg[2], &panel_rows = seg[3],
            &item_begin = seg[4], &panel_col_begin = seg[5], &panel_a_begin = seg[6], &zero_begin = seg[7],
            &zero_rows = seg[8], &row_ptr = seg[9];
  const index_t n_pcols = h[11], n_a = h[12];
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
    if (h[8] < 0 || item_begin.n != h[8] + 1) bad_plan("item_begin must have n_items + 1 entries");
    check_monotone(item_begin, 0, n_panels, "item_begin");
    check_monotone(zero_begin, 0, zero_rows.n, "zero_begin");
    check_range(zero_rows, zero_begin[P2], 0, K, "zero_rows");
  }
  return {p, m, K, C, mr, csr, panel_begin.p, panel_xi.p, panel_row_begin.p, panel_rows.p, acc.data(), h[8],
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

const float* optional_bias(const py::object& bias_obj, carray<float>& keep, index_t& n) {
  n = 0;
  if (bias_obj.is_none()) return nullptr;
  keep = as_array<float>(bias_obj, "bias");
  expect_ndim(keep, 1, "bias");
  n = keep.shape(0);
  return keep.data();
}

void winograd_run(const py::handle& x_obj, const py::handle& meta_obj, const py::handle& cols_obj,
                  const py::handle& vals_obj, const py::handle& acc_obj, const py::object& bias_obj, int act,
                  index_t pad_top, index_t pad_left, const py::handle& out_obj, int threads) {
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
  const auto& table = table_for_mr(static_cast<int>(meta.data()[3]), meta.data()[6] != 0);
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
  table.winograd_forward(view, g, xp, yp, wp, need, nt);
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
  if (meta.size() < kDwHeader || h[0] != kDwFormat) bad_plan("meta has an unknown format");
  const index_t C = h[1], kh = h[2], kw = h[3], sh = h[4], sw = h[5], n_taps = h[6];
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
  if (act < 0 || act >= winoprune::n_activations) throw py::value_error("act must be in [0, 5), got " + std::to_string(act));
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

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "lightning_winoprune native kernels (torch-free C++17 on float32 buffers).";
  mod.def("filter_transform", &filter_transform, py::arg("g"), py::arg("G"), py::arg("out"),
          "U = G g G^T for every (3, 3) kernel of g, accumulated in float64, written to out (..., p, p).");
  mod.def("input_transform", &input_transform, py::arg("x"), py::arg("BT"), py::arg("pad_top"), py::arg("pad_left"),
          py::arg("th"), py::arg("tw"), py::arg("out"), py::arg("isa") = py::none(),
          "V[xi] = B^T d B for every tile of NCHW x; out is (p*p, C, T). isa: None (detected) or a supported name.");
  mod.def("input_transform_adjoint", &input_transform_adjoint, py::arg("dV"), py::arg("BT"), py::arg("pad_top"),
          py::arg("pad_left"), py::arg("th"), py::arg("tw"), py::arg("out"), py::arg("isa") = py::none(),
          "Transpose of input_transform: scatter-adds B dV B^T into out (N, C, H, W), which it overwrites.");
  mod.def("output_transform", &output_transform, py::arg("M"), py::arg("AT"), py::arg("bias"), py::arg("th"),
          py::arg("tw"), py::arg("out"), py::arg("isa") = py::none(), py::arg("rows") = py::none(),
          "y = A^T M A (+ bias) for every tile, cropped into out (N, K, Ho, Wo). M is (p*p, K, T), or (R, T) with "
          "rows: int64 (p*p, K), the row of M of each (position, channel), -1 for an all-zero row.");
  mod.def("output_transform_adjoint", &output_transform_adjoint, py::arg("dy"), py::arg("AT"), py::arg("th"),
          py::arg("tw"), py::arg("out"), py::arg("isa") = py::none(), py::arg("rows") = py::none(),
          "Transpose of output_transform (without bias): out (p*p, K, T), or (R, T) with rows (each row at most "
          "once; -1 entries are not written, rows no entry maps to are zeroed).");
  mod.def("isa", [] { return isa_name(winoprune::detect_isa()); },
          "The ISA the kernels dispatch to: the widest this CPU supports, capped by $WINOPRUNE_ISA.");
  mod.def("supported_isas", &supported_isas, "ISAs this CPU (and this build) can run.");
  py::class_<PyWinogradPlan>(mod, "WinogradPlan", "Winograd-domain weights packed for the native conv kernels.")
      .def_property_readonly("m", [](const PyWinogradPlan& p) { return p.plan.m; })
      .def_property_readonly("K", [](const PyWinogradPlan& p) { return p.plan.K; })
      .def_property_readonly("C", [](const PyWinogradPlan& p) { return p.plan.C; })
      .def_property_readonly("csr", [](const PyWinogradPlan& p) { return p.plan.csr; })
      .def_property_readonly("isa", [](const PyWinogradPlan& p) { return isa_name(p.plan.isa); })
      .def_property_readonly("kept", [](const PyWinogradPlan& p) { return p.plan.kept; }, "Kept weights.")
      .def_property_readonly("work", [](const PyWinogradPlan& p) { return p.plan.work; },
                             "Multiply-adds per tile actually run (panel padding included).")
      .def_property_readonly("n_panels", [](const PyWinogradPlan& p) { return p.plan.n_panels(); })
      .def_property_readonly("balanced", [](const PyWinogradPlan& p) { return p.plan.balanced(); })
      .def("workspace_size", &PyWinogradPlan::workspace_size, py::arg("N"), py::arg("H"), py::arg("W"),
           py::arg("pad_top"), py::arg("pad_left"), py::arg("Ho"), py::arg("Wo"), py::arg("threads") = -1,
           "Floats of workspace forward() needs for this input geometry and thread count.")
      .def("forward", &PyWinogradPlan::forward, py::arg("x"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
           py::arg("workspace"), py::arg("threads") = -1,
           "y = conv(x) into out (N, K, Ho, Wo); padding beyond (pad_top, pad_left) follows from out's size.");
  py::class_<PyDepthwisePlan>(mod, "DepthwisePlan", "A pruned depthwise conv packed as kept taps per channel.")
      .def_property_readonly("C", [](const PyDepthwisePlan& p) { return p.plan.C; })
      .def_property_readonly("kept", [](const PyDepthwisePlan& p) { return p.plan.kept(); }, "Kept taps.")
      .def("forward", &PyDepthwisePlan::forward, py::arg("x"), py::arg("pad_top"), py::arg("pad_left"),
           py::arg("out"), py::arg("threads") = -1, "Depthwise conv of x into out (N, C, Ho, Wo).");
  mod.def("pack_winograd", &pack_winograd, py::arg("U"), py::arg("mask"), py::arg("m"), py::arg("bias") = py::none(),
          py::arg("csr") = false, py::arg("isa") = py::none(),
          "Pack U (p*p, K, C) float32 and its bool mask into panels (or CSR rows when csr=True) for one ISA.");
  mod.def("pack_depthwise", &pack_depthwise, py::arg("weight"), py::arg("mask"), py::arg("stride_h") = 1,
          py::arg("stride_w") = 1, py::arg("bias") = py::none(),
          "Pack a depthwise weight (C, kh, kw) float32 and its bool mask as kept taps per channel.");
  mod.def("winograd_plan_arrays", &winograd_arrays, py::arg("plan"),
          "A WinogradPlan as (meta int64, cols int32, vals float32, acc uint8) arrays for winograd_run.");
  mod.def("depthwise_plan_arrays", &depthwise_arrays, py::arg("plan"),
          "A DepthwisePlan as (meta int64, taps int32, weights float32) arrays for depthwise_run.");
  mod.def("winograd_run", &winograd_run, py::arg("x"), py::arg("meta"), py::arg("cols"), py::arg("vals"),
          py::arg("acc"), py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1,
          "Winograd conv of x into out from a plan's arrays (validated), with a fused activation; thread-safe.");
  mod.def("depthwise_run", &depthwise_run, py::arg("x"), py::arg("meta"), py::arg("taps"), py::arg("weights"),
          py::arg("bias"), py::arg("act"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"),
          py::arg("threads") = -1,
          "Pruned depthwise conv of x into out from a plan's arrays (validated), with a fused activation.");
  mod.def("max_pool_run", &max_pool_run, py::arg("x"), py::arg("kh"), py::arg("kw"), py::arg("stride_h"),
          py::arg("stride_w"), py::arg("pad_top"), py::arg("pad_left"), py::arg("out"), py::arg("threads") = -1,
          "Max pooling of NCHW x into out (N, C, Ho, Wo); outside the input counts as -inf, NaN propagates.");
  mod.def("max_threads", &winoprune::max_threads, "Threads the kernels use (OpenMP max threads, 1 without OpenMP).");
#if defined(_OPENMP)
  mod.attr("openmp") = true;
#else
  mod.attr("openmp") = false;
#endif
}
