// Packing of Winograd-domain weights into the compacted forms the kernels run (torch-free, ISA-independent).
//
// U and its mask are (P2, K, C), position-major: U[xi] is the K x C matrix of Winograd position xi.
//   structured: per position, the rows with any kept weight are grouped by their kept-column pattern and cut into
//               panels of `mr` rows; a panel keeps the union of its rows' kept columns. So WSP-R/BWSP (whole rows)
//               run only kept rows, WSP-C (whole columns) gathers only kept input channels, and row segments
//               (ABWSP) skip the column ranges that a whole panel pruned. Dense U is the special case with one
//               pattern. Balanced layers give every position the same number of panels.
//   csr       : the WWP baseline; every kept element is an entry of a CSR row (no structure to exploit).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "isa.h"

namespace winoprune {

struct WinogradPlan {
  int p = 0, m = 0, mr = 0;
  index_t K = 0, C = 0;
  bool csr = false;
  Isa isa = Isa::generic;
  std::vector<index_t> panel_begin, panel_xi, panel_row_begin, panel_rows, panel_col_begin, panel_a_begin, zero_begin,
      zero_rows, row_ptr, item_begin;
  std::vector<std::uint8_t> panel_row_acc;
  std::vector<std::int32_t> panel_cols, csr_cols;
  std::vector<float> A, csr_vals, bias;
  int act = act_none;        // fused activation (Activation)
  index_t kept = 0;          // kept (unmasked) weights
  index_t work = 0;          // multiply-adds per tile column actually run (panel padding included)

  WinogradPlanView view() const {
    return {p, m, K, C, mr, csr, panel_begin.data(), panel_xi.data(), panel_row_begin.data(), panel_rows.data(),
            panel_row_acc.data(), static_cast<index_t>(item_begin.empty() ? 0 : item_begin.size() - 1),
            item_begin.data(), panel_col_begin.data(), panel_a_begin.data(), panel_cols.data(), A.data(), zero_begin.data(), zero_rows.data(), row_ptr.data(), csr_cols.data(),
            csr_vals.data(), bias.empty() ? nullptr : bias.data(), act};
  }
  index_t positions() const { return static_cast<index_t>(p) * p; }
  index_t n_panels() const { return panel_begin.empty() ? 0 : panel_begin.back(); }
  // True when every position runs the same number of panels (equal-shape batched GEMMs).
  bool balanced() const {
    if (csr) return false;
    for (index_t xi = 1; xi < positions(); ++xi)
      if (panel_begin[xi + 1] - panel_begin[xi] != panel_begin[1] - panel_begin[0]) return false;
    return true;
  }
};

// One candidate packing of position xi: its kept columns cut into blocks of S, each block's rows (those with a
// kept weight in it) grouped by their pattern within the block and cut into panels.
struct PanelDraft {
  std::vector<index_t> rows;               // h rows (K = padding)
  std::vector<std::int32_t> cols;
};

inline std::vector<PanelDraft> draft_panels(const bool* mk, index_t K, index_t C, index_t mr, index_t S) {
  std::vector<PanelDraft> out;
  std::vector<index_t> rows;
  const index_t third = std::max<index_t>(mr / 3, 1);
  for (index_t c0 = 0; c0 < C; c0 += S) {
    const index_t c1 = std::min(C, c0 + S);
    rows.clear();
    for (index_t k = 0; k < K; ++k) {
      bool any = false;
      for (index_t c = c0; c < c1 && !any; ++c) any = mk[k * C + c];
      if (any) rows.push_back(k);
    }
    // rows with the same kept-column pattern (within the block) end up in the same panels
    std::stable_sort(rows.begin(), rows.end(), [&](index_t a, index_t b) {
      return std::lexicographical_compare(mk + b * C + c0, mk + b * C + c1, mk + a * C + c0, mk + a * C + c1);
    });
    for (std::size_t r0 = 0; r0 < rows.size();) {
      // full panels of mr rows; the last one only as high as needed: mr / 3 or 2 mr / 3 (less padding work)
      const index_t left = static_cast<index_t>(rows.size() - r0);
      const index_t h = left >= mr ? mr : std::min<index_t>(mr, (left + third - 1) / third * third);
      PanelDraft d;
      for (index_t r = 0; r < h; ++r) d.rows.push_back(r < left ? rows[r0 + r] : K);
      for (index_t c = c0; c < c1; ++c) {
        bool any = false;
        for (index_t r = 0; r < std::min(h, left) && !any; ++r) any = mk[rows[r0 + r] * C + c];
        if (any) d.cols.push_back(static_cast<std::int32_t>(c));
      }
      out.push_back(std::move(d));
      r0 += static_cast<std::size_t>(std::min(h, left));
    }
  }
  return out;
}

inline void pack_structured(WinogradPlan& pl, const float* U, const bool* mask) {
  const index_t P2 = pl.positions(), K = pl.K, C = pl.C, mr = pl.mr;
  pl.panel_begin.assign(1, 0);
  pl.panel_col_begin.assign(1, 0);
  pl.panel_row_begin.assign(1, 0);
  pl.panel_a_begin.assign(1, 0);
  pl.zero_begin.assign(1, 0);
  pl.item_begin.assign(1, 0);
  std::vector<bool> written;
  for (index_t xi = 0; xi < P2; ++xi) {
    const float* u = U + xi * K * C;
    const bool* mk = mask + xi * K * C;
    // column blocks: whole rows (S = C) for row / column patterns, narrower when rows keep different segments
    std::vector<PanelDraft> best;
    index_t best_cost = -1, best_S = C;
    for (index_t S : {C, index_t{64}, index_t{32}, index_t{16}, index_t{8}}) {
      if (S > C || (S == C && best_cost >= 0) || (S < C && C % S != 0 && S != 8)) continue;
      auto draft = draft_panels(mk, K, C, mr, S);
      index_t cost = 0;  // multiply-adds plus a few columns' worth for each panel's epilogue
      for (const auto& d : draft) cost += (static_cast<index_t>(d.cols.size()) + 3) * static_cast<index_t>(d.rows.size());
      if (best_cost < 0 || cost < best_cost) {
        best_cost = cost;
        best = std::move(draft);
        best_S = S;
      }
    }
    written.assign(static_cast<std::size_t>(K) + 1, false);
    for (const auto& d : best) {
      const index_t h = static_cast<index_t>(d.rows.size());
      for (index_t k : d.rows) {
        pl.panel_rows.push_back(k);
        // the first panel to reach a row stores, later ones (other column blocks) accumulate
        pl.panel_row_acc.push_back(k < K && written[k] ? 1 : 0);
        written[k] = true;
      }
      for (std::int32_t c : d.cols) {
        for (index_t k : d.rows) pl.A.push_back(k < K && mk[k * C + c] ? u[k * C + c] : 0.0f);
        pl.panel_cols.push_back(c);
      }
      pl.panel_row_begin.push_back(static_cast<index_t>(pl.panel_rows.size()));
      pl.panel_a_begin.push_back(static_cast<index_t>(pl.A.size()));
      pl.panel_col_begin.push_back(static_cast<index_t>(pl.panel_cols.size()));
      pl.work += static_cast<index_t>(d.cols.size()) * h;
      pl.panel_xi.push_back(xi);
      // whole-row panels are independent work items; panels that share rows run in order as one item
      if (best_S == C) pl.item_begin.push_back(static_cast<index_t>(pl.panel_xi.size()));
    }
    if (best_S != C && !best.empty()) pl.item_begin.push_back(static_cast<index_t>(pl.panel_xi.size()));
    for (index_t k = 0; k < K; ++k)
      if (!written[k]) pl.zero_rows.push_back(k);
    pl.zero_begin.push_back(static_cast<index_t>(pl.zero_rows.size()));
    pl.panel_begin.push_back(static_cast<index_t>(pl.panel_xi.size()));
  }
}

inline void pack_csr(WinogradPlan& pl, const float* U, const bool* mask) {
  const index_t rows = pl.positions() * pl.K, C = pl.C;
  pl.row_ptr.assign(1, 0);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t c = 0; c < C; ++c)
      if (mask[r * C + c]) {
        pl.csr_cols.push_back(static_cast<std::int32_t>(c));
        pl.csr_vals.push_back(U[r * C + c]);
      }
    pl.row_ptr.push_back(static_cast<index_t>(pl.csr_cols.size()));
  }
  pl.work = static_cast<index_t>(pl.csr_cols.size());
}

// What every packed Winograd plan needs of its shape (the float32 and the bfloat16 packers).
inline void check_plan_shape(int m, index_t K, index_t C) {
  if (m != 2 && m != 4) throw std::invalid_argument("native Winograd kernels support m = 2 and m = 4");
  if (K < 1 || C < 1) throw std::invalid_argument("K and C must be >= 1");
  if (C > INT32_MAX) throw std::invalid_argument("C too large");
}

// U, mask: (p*p, K, C); bias: (K) or nullptr. mr: the panel height of the ISA the plan will run on.
inline WinogradPlan pack_winograd(const float* U, const bool* mask, int m, index_t K, index_t C, const float* bias,
                                  bool csr, Isa isa, int mr) {
  check_plan_shape(m, K, C);
  WinogradPlan pl;
  pl.m = m;
  pl.p = m + 2;
  pl.K = K;
  pl.C = C;
  pl.mr = mr;
  pl.csr = csr;
  pl.isa = isa;
  const index_t total = pl.positions() * K * C;
  for (index_t i = 0; i < total; ++i) pl.kept += mask[i] ? 1 : 0;
  if (bias) pl.bias.assign(bias, bias + K);
  if (csr) pack_csr(pl, U, mask);
  else pack_structured(pl, U, mask);
  // keep every vector non-empty so view() never hands out a null pointer for an array the kernel indexes
  if (pl.panel_row_begin.empty()) pl.panel_row_begin.push_back(0);
  if (pl.item_begin.empty()) pl.item_begin.push_back(0);
  if (pl.panel_row_acc.empty()) pl.panel_row_acc.push_back(0);
  if (pl.panel_a_begin.empty()) pl.panel_a_begin.push_back(0);
  for (auto* v : {&pl.panel_xi, &pl.panel_rows, &pl.zero_rows, &pl.row_ptr})
    if (v->empty()) v->push_back(0);
  if (pl.panel_begin.empty()) pl.panel_begin.assign(pl.positions() + 1, 0);
  if (pl.zero_begin.empty()) pl.zero_begin.assign(pl.positions() + 1, 0);
  if (pl.panel_col_begin.empty()) pl.panel_col_begin.push_back(0);
  if (pl.panel_cols.empty()) pl.panel_cols.push_back(0);
  if (pl.csr_cols.empty()) pl.csr_cols.push_back(0);
  if (pl.A.empty()) pl.A.push_back(0.0f);
  if (pl.csr_vals.empty()) pl.csr_vals.push_back(0.0f);
  return pl;
}

// A pruned depthwise conv: the kept taps of each channel.
struct DepthwisePlan {
  index_t C = 0;
  int kh = 0, kw = 0, stride_h = 1, stride_w = 1;
  std::vector<index_t> tap_begin;
  std::vector<std::int32_t> tap_dy, tap_dx;
  std::vector<float> tap_w, bias;
  int act = act_none;

  DepthwisePlanView view() const {
    return {C, kh, kw, stride_h, stride_w, tap_begin.data(), tap_dy.data(), tap_dx.data(), tap_w.data(),
            bias.empty() ? nullptr : bias.data(), act};
  }
  index_t kept() const { return tap_begin.empty() ? 0 : tap_begin.back(); }
};

// weight, mask: (C, kh, kw); bias: (C) or nullptr.
inline DepthwisePlan pack_depthwise(const float* weight, const bool* mask, index_t C, int kh, int kw, int stride_h,
                                    int stride_w, const float* bias) {
  if (C < 1 || kh < 1 || kw < 1) throw std::invalid_argument("depthwise weight must have C, kh, kw >= 1");
  if (stride_h < 1 || stride_w < 1) throw std::invalid_argument("stride must be >= 1");
  DepthwisePlan pl;
  pl.C = C;
  pl.kh = kh;
  pl.kw = kw;
  pl.stride_h = stride_h;
  pl.stride_w = stride_w;
  pl.tap_begin.assign(1, 0);
  for (index_t c = 0; c < C; ++c) {
    for (int dy = 0; dy < kh; ++dy)
      for (int dx = 0; dx < kw; ++dx) {
        const index_t i = (c * kh + dy) * kw + dx;
        if (!mask[i]) continue;
        pl.tap_dy.push_back(dy);
        pl.tap_dx.push_back(dx);
        pl.tap_w.push_back(weight[i]);
      }
    pl.tap_begin.push_back(static_cast<index_t>(pl.tap_w.size()));
  }
  if (pl.tap_w.empty()) {
    pl.tap_dy.push_back(0);
    pl.tap_dx.push_back(0);
    pl.tap_w.push_back(0.0f);
  }
  if (bias) pl.bias.assign(bias, bias + C);
  return pl;
}

}  // namespace winoprune
