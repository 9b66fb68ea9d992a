// Bindings of the training tile transforms (filter_transform.h, winograd_tiles.h and the vector versions in
// training_kernels.h): the numpy side of lightning_winoprune.winograd's native route.
#include "bind_common.h"
#include "filter_transform.h"
#include "winograd_tiles.h"

namespace winoprune_py {
namespace {

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

}  // namespace

void bind_training(py::module_& mod) {
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
}

}  // namespace winoprune_py
