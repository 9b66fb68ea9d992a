// Shared validation helpers of the pybind11 bindings (module lightning_winoprune.kernels._C).
// Arrays must be C-contiguous and of the exact dtype (anything else is a TypeError naming the argument); inconsistent
// shapes are a ValueError. Nothing is ever converted or copied implicitly. One bind_*.cpp per kernel family registers
// its functions through the bind_* declarations at the end.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "isa.h"

namespace winoprune_py {

namespace py = pybind11;
using winoprune::index_t;

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

inline std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

inline const char* isa_name(winoprune::Isa isa) {
  switch (isa) {
    case winoprune::Isa::avx512: return "avx512";
    case winoprune::Isa::avx2: return "avx2";
    default: return "generic";
  }
}

inline py::list supported_isas() {
  py::list out;
  for (auto isa : {winoprune::Isa::generic, winoprune::Isa::avx2, winoprune::Isa::avx512})
    if (winoprune::isa_supported(isa)) out.append(isa_name(isa));
  return out;
}

// Type checks happen before pybind's own conversion so that the message names the argument.
template <typename T>
inline carray<T> as_array(const py::handle& obj, const char* name, bool writable = false) {
  const char* want = std::is_same<T, float>::value           ? "float32"
                     : std::is_same<T, bool>::value          ? "bool"
                     : std::is_same<T, std::int64_t>::value  ? "int64"
                     : std::is_same<T, std::int32_t>::value  ? "int32"
                     : std::is_same<T, std::uint8_t>::value  ? "uint8"
                     : std::is_same<T, std::uint16_t>::value ? "uint16"
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

inline void expect_ndim(const py::array& a, py::ssize_t ndim, const char* name) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
}

inline void expect_shape(const py::array& a, std::initializer_list<index_t> shape, const char* name) {
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

inline winoprune::Isa parse_isa(const py::object& isa) {
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

inline int resolve_threads(int threads) {
  if (threads == 0 || threads < -1) throw py::value_error("threads must be >= 1 or -1 (all), got " + std::to_string(threads));
  return threads == -1 ? winoprune::max_threads() : threads;
}

// Validates padding and the output size of a conv whose input is (.., H, W) and kernel (kh, kw), stride (sh, sw).
inline void check_conv_geometry(index_t H, index_t W, index_t pad_top, index_t pad_left, index_t Ho, index_t Wo, index_t kh,
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

template <typename T>
inline py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

[[noreturn]] inline void bad_plan(const std::string& what) {
  throw py::value_error("invalid packed plan: " + what + " (re-create it with lightning_winoprune.deploy)");
}

// A segment of meta: [begin, end) with a length check.
struct Seg {
  const index_t* p;
  index_t n;
  index_t operator[](index_t i) const { return p[i]; }
};

inline void check_monotone(const Seg& s, index_t first, index_t last_max, const char* name) {
  if (s.n < 1 || s[0] != first) bad_plan(std::string(name) + " must start at " + std::to_string(first));
  for (index_t i = 1; i < s.n; ++i)
    if (s[i] < s[i - 1]) bad_plan(std::string(name) + " must be non-decreasing");
  if (s[s.n - 1] > last_max) bad_plan(std::string(name) + " points past its array");
}

inline void check_range(const Seg& s, index_t count, index_t lo, index_t hi, const char* name) {
  if (count > s.n) bad_plan(std::string(name) + " is too short");
  for (index_t i = 0; i < count; ++i)
    if (s[i] < lo || s[i] >= hi) bad_plan(std::string(name) + " holds an index out of range");
}

inline const float* optional_bias(const py::object& bias_obj, carray<float>& keep, index_t& n) {
  n = 0;
  if (bias_obj.is_none()) return nullptr;
  keep = as_array<float>(bias_obj, "bias");
  expect_ndim(keep, 1, "bias");
  n = keep.shape(0);
  return keep.data();
}

inline void check_activation(int act) {
  if (act < 0 || act >= winoprune::n_activations)
    throw py::value_error("act must be in [0, " + std::to_string(winoprune::n_activations) + "), got " +
                          std::to_string(act));
}

// U (p*p, K, C) float32 and its bool mask of the same shape, for an F(m, 3) plan; m must be 2 or 4.
inline void check_winograd_weights(const carray<float>& U, const carray<bool>& mask, int m) {
  if (m != 2 && m != 4) throw py::value_error("m=" + std::to_string(m) + " is not valid; valid values are [2, 4]");
  const index_t P2 = static_cast<index_t>(m + 2) * (m + 2);
  expect_ndim(U, 3, "U");
  if (U.shape(0) != P2 || U.shape(1) < 1 || U.shape(2) < 1)
    throw py::value_error("U must be (p*p, K, C) = (" + std::to_string(P2) + ", K, C) with K, C >= 1, got " +
                          shape_str(U));
  expect_shape(mask, {P2, U.shape(1), U.shape(2)}, "mask");
}

// A kernel's stage times as the profile functions return them: {"input", "gemm", "output"} thread-seconds.
inline py::dict stage_dict(const winoprune::StageSeconds& st) {
  py::dict d;
  d["input"] = st.input;
  d["gemm"] = st.gemm;
  d["output"] = st.output;
  return d;
}

// The families' registrations, called once from PYBIND11_MODULE (bindings.cpp).
void bind_training(py::module_& mod);
void bind_winograd(py::module_& mod);
void bind_winograd_bf16(py::module_& mod);
void bind_depthwise(py::module_& mod);
void bind_pool(py::module_& mod);

}  // namespace winoprune_py
