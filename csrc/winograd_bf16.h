// Packing of Winograd-domain weights for the bfloat16 kernels (torch-free, ISA-independent).
//
// U and its mask are (P2, K, C) as in winograd_conv.h. The bfloat16 kernels multiply in hardware tiles: an AMX tile
// (TDPBF16PS) or a row of VDPBF16PS takes 16 output rows by 32 input channels. So, per Winograd position xi:
//   - the rows with any kept weight are grouped by which 32-channel chunks they keep and cut into panels of 16 rows
//     (the last one padded with zero rows); a pruned row (WSP-R, BWSP) is never loaded;
//   - a panel keeps the union of its rows' kept chunks; a chunk that every row of the panel pruned (ABWSP units of
//     32) is a tile that is never loaded;
//   - A holds, per (panel, kept chunk), the 16 x 32 weights row-major in bfloat16 (rounded to nearest even).
// A panel writes its own 16 rows of a compacted M; row_map[xi * K + k] names the row of M that holds output channel k
// at position xi, or -1 when row k is pruned at xi (it reads as zero).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <vector>

#include "isa.h"
#include "winograd_conv.h"

namespace winoprune {

struct WinogradBf16Plan {
  int p = 0, m = 0;
  index_t K = 0, C = 0;
  std::vector<index_t> panel_xi, panel_rows, chunk_begin, row_map;
  std::vector<std::int32_t> chunks;
  std::vector<std::uint16_t> A;
  std::vector<float> bias;
  int act = act_none;
  index_t kept = 0;  // kept (unmasked) weights
  index_t work = 0;  // multiply-adds per tile actually run (tile padding included)

  index_t positions() const { return static_cast<index_t>(p) * p; }
  index_t n_panels() const { return static_cast<index_t>(chunk_begin.size()) - 1; }
  WinogradBf16View view() const {
    return {p, m, K, C, n_panels(), panel_xi.data(), panel_rows.data(), chunk_begin.data(), chunks.data(),
            A.data(), row_map.data(), bias.empty() ? nullptr : bias.data(), act};
  }
};

// One position's panels: kept rows grouped by their chunk pattern (rows with equal patterns share panels).
inline void pack_bf16_position(WinogradBf16Plan& pl, index_t xi, const float* u, const bool* mk) {
  const index_t K = pl.K, C = pl.C, n_chunks = (C + kBf16Chunk - 1) / kBf16Chunk;
  std::map<std::vector<bool>, std::vector<index_t>> groups;  // ordered: the packing is deterministic
  for (index_t k = 0; k < K; ++k) {
    std::vector<bool> pattern(static_cast<std::size_t>(n_chunks), false);
    bool any = false;
    for (index_t c = 0; c < C; ++c)
      if (mk[k * C + c]) pattern[static_cast<std::size_t>(c / kBf16Chunk)] = any = true;
    if (any) groups[pattern].push_back(k);
  }
  // fill whole panels from one pattern first; the remainders of all patterns then share panels (union of chunks)
  std::vector<index_t> rest;
  std::vector<std::vector<index_t>> panels;
  for (auto& [pattern, rows] : groups) {
    std::size_t r0 = 0;
    for (; r0 + kBf16Rows <= rows.size(); r0 += kBf16Rows)
      panels.emplace_back(rows.begin() + static_cast<std::ptrdiff_t>(r0),
                          rows.begin() + static_cast<std::ptrdiff_t>(r0 + kBf16Rows));
    rest.insert(rest.end(), rows.begin() + static_cast<std::ptrdiff_t>(r0), rows.end());
  }
  for (std::size_t r0 = 0; r0 < rest.size(); r0 += kBf16Rows)
    panels.emplace_back(rest.begin() + static_cast<std::ptrdiff_t>(r0),
                        rest.begin() + static_cast<std::ptrdiff_t>(std::min(rest.size(), r0 + kBf16Rows)));
  for (const auto& rows : panels) {
    const index_t q = pl.n_panels();
    pl.panel_xi.push_back(xi);
    for (index_t r = 0; r < kBf16Rows; ++r) {
      const index_t k = r < static_cast<index_t>(rows.size()) ? rows[static_cast<std::size_t>(r)] : K;
      pl.panel_rows.push_back(k);
      if (k < K) pl.row_map[static_cast<std::size_t>(xi * K + k)] = q * kBf16Rows + r;
    }
    for (index_t j = 0; j < n_chunks; ++j) {
      bool any = false;
      for (index_t k : rows)
        for (index_t c = j * kBf16Chunk; c < std::min(C, (j + 1) * kBf16Chunk) && !any; ++c) any = mk[k * C + c];
      if (!any) continue;
      pl.chunks.push_back(static_cast<std::int32_t>(j));
      for (index_t r = 0; r < kBf16Rows; ++r)
        for (index_t cc = 0; cc < kBf16Chunk; ++cc) {
          const index_t c = j * kBf16Chunk + cc;
          const bool keep = r < static_cast<index_t>(rows.size()) && c < C;
          const index_t k = keep ? rows[static_cast<std::size_t>(r)] : 0;
          pl.A.push_back(keep && mk[k * C + c] ? to_bf16(u[k * C + c]) : std::uint16_t{0});
        }
      pl.work += kBf16Rows * kBf16Chunk;
    }
    pl.chunk_begin.push_back(static_cast<index_t>(pl.chunks.size()));
  }
}

// U, mask: (p*p, K, C); bias: (K) or nullptr.
inline WinogradBf16Plan pack_winograd_bf16(const float* U, const bool* mask, int m, index_t K, index_t C,
                                           const float* bias) {
  check_plan_shape(m, K, C);
  WinogradBf16Plan pl;
  pl.m = m;
  pl.p = m + 2;
  pl.K = K;
  pl.C = C;
  pl.row_map.assign(static_cast<std::size_t>(pl.positions() * K), -1);
  pl.chunk_begin.assign(1, 0);
  for (index_t i = 0; i < pl.positions() * K * C; ++i) pl.kept += mask[i] ? 1 : 0;
  for (index_t xi = 0; xi < pl.positions(); ++xi) pack_bf16_position(pl, xi, U + xi * K * C, mask + xi * K * C);
  if (bias) pl.bias.assign(bias, bias + K);
  // keep every vector non-empty so view() never hands out a null pointer for an array the kernel indexes
  if (pl.panel_xi.empty()) pl.panel_xi.push_back(0);
  if (pl.panel_rows.empty()) pl.panel_rows.push_back(K);
  if (pl.chunks.empty()) pl.chunks.push_back(0);
  if (pl.A.empty()) pl.A.push_back(0);
  return pl;
}

}  // namespace winoprune
