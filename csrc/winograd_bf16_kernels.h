// Winograd convolution F(m x m, 3 x 3) with a bfloat16 multiply: float32 in and out, float32 transforms and sums.
//
// Included only by kernels_isa.cpp in the avx512 build (VW = 16), after winograd_conv_kernels.h, whose tile blocks,
// transforms and output stage it shares. The bfloat16 and AMX instructions are enabled per function (target
// attributes), so nothing else in the build can use them and the extension still loads on any x86-64 CPU; the
// caller runs a path only where detect_bf16() found it (CPU flags, and for AMX the tile state granted by Linux).
//
// Per block of Tb tiles (sub-blocks of 16 or 32, see Bf16Layout):
//   1. input transform in float32, rounded to bfloat16 into Vb[xi][c / 2][t][2] (VNNI: channels 2j and 2j + 1 of a
//      tile side by side), channels padded with zeros to a multiple of 32;
//   2. per panel (16 kept rows of one position xi, see winograd_bf16.h), for each kept 32-channel chunk:
//      amx:        one TDPBF16PS per 16 tiles: C (16 rows x 16 tiles, float32) += A (16 x 32) . B (Vb, 16 pair rows);
//      avx512bf16: VDPBF16PS rows: 16 tiles of a row gain two channels' products per instruction;
//      then stored as the panel's 16 rows of the compacted M;
//   3. output transform in float32 (A^T M A + bias, activation) reading M through the plan's row map.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

#define WINOPRUNE_BF16_TARGET __attribute__((target("avx512bf16,avx512bw")))
#define WINOPRUNE_AMX_TARGET __attribute__((target("avx512bf16,avx512bw,amx-tile,amx-bf16")))

namespace winograd_bf16_detail {

using namespace winograd_detail;
static_assert(VW == 16, "the bfloat16 kernels are written for 16-float vectors");

inline index_t padded_channels(index_t C) { return (C + kBf16Chunk - 1) / kBf16Chunk * kBf16Chunk; }
// Vb's stride between positions, in bfloat16 values: one cache line more than the plain size (see v_stride).
inline index_t vb_stride(index_t C, index_t Tb) { return padded_channels(C) * Tb + 32; }

// Tiles run in sub-blocks of `sub` = 16 or 32 (one TileInfo: the transforms' unit) inside blocks of Tb tiles (the rows
// of Vb and M: the multiply's unit). Many sub-blocks: each thread runs its own blocks of one sub-block (private
// buffers, no synchronisation). Few (small maps, batch 1): the threads share blocks as large as fit in kBlockBytes,
// so that every weight tile is loaded once per call and the threads meet four times per block, not per sub-block.
constexpr index_t kMaxSubs = 16;                    // sub-blocks per shared block
constexpr index_t kBlockBytes = index_t{3} << 19;   // 1.5 MiB of Vb and M per shared block

struct Bf16Layout {
  index_t T, th, tw, sub, Tb, blocks, subs;
  int nv;  // 16-tile groups per sub-block
  bool shared;
  index_t vb_floats, mc_rows, mc_floats, slot_floats, slots;
};

inline Bf16Layout bf16_layout(const WinogradBf16View& pl, const ConvGeometry& g, int threads) {
  Bf16Layout L{};
  const TileCounts tc = tile_counts(pl.m, g);
  L.th = tc.th;
  L.tw = tc.tw;
  L.T = tc.T;
  L.nv = tc.nv;
  L.sub = L.nv * VW;
  const index_t n_sub = (L.T + L.sub - 1) / L.sub;
  L.shared = threads > 1 && n_sub < 4 * static_cast<index_t>(threads);
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p;
  L.mc_rows = pl.n_panels * kBf16Rows + 1;  // the last row stays zero: pruned (xi, k) read it
  L.subs = 1;
  if (L.shared) {  // as many sub-blocks as fit, then spread evenly over the blocks
    const index_t per_tile = P2 * padded_channels(pl.C) * 2 + L.mc_rows * 4;
    const index_t fit = std::clamp<index_t>(kBlockBytes / std::max<index_t>(per_tile * L.sub, 1), 1, kMaxSubs);
    const index_t n_blocks = (n_sub + fit - 1) / fit;
    L.subs = (n_sub + n_blocks - 1) / n_blocks;
  }
  L.Tb = L.subs * L.sub;
  L.blocks = (L.T + L.Tb - 1) / L.Tb;
  L.vb_floats = (P2 * vb_stride(pl.C, L.Tb) + 1) / 2;
  L.mc_floats = L.mc_rows * L.Tb;
  L.slot_floats = (L.vb_floats + L.mc_floats + 31) / 16 * 16;  // room to align both to 64 bytes
  L.slots = L.shared ? 1 : std::max(threads, 1);
  return L;
}

// A slot of the workspace: Vb and the compacted M, both 64-byte aligned.
struct Bf16Slot {
  std::uint16_t* Vb;
  float* Mc;
};

inline Bf16Slot bf16_slot(float* ws, const Bf16Layout& L, index_t s) {
  float* base = ws + s * L.slot_floats;
  base += (16 - (reinterpret_cast<std::uintptr_t>(base) / 4) % 16) % 16;
  float* mc = base + (L.vb_floats + 15) / 16 * 16;
  return {reinterpret_cast<std::uint16_t*>(base), mc};
}

// The pair rows no channel writes (C rounded up to 32) and M's zero row: zeroed once per call.
inline void bf16_clear(const WinogradBf16View& pl, const Bf16Layout& L, const Bf16Slot& s) {
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p, first = (pl.C + 1) / 2, last = padded_channels(pl.C) / 2;
  const std::size_t bytes = sizeof(std::uint16_t) * static_cast<std::size_t>((last - first) * L.Tb * 2);
  for (index_t xi = 0; xi < P2; ++xi) std::memset(s.Vb + xi * vb_stride(pl.C, L.Tb) + first * L.Tb * 2, 0, bytes);
  std::memset(s.Mc + (L.mc_rows - 1) * L.Tb, 0, sizeof(float) * L.Tb);
}

// Lane l of the result: bfloat16(hi[l]) << 16 | bfloat16(lo[l]), i.e. the pair (lo, hi) of tile l in VNNI order.
WINOPRUNE_BF16_TARGET inline __m512i pack_pair(wp_vf lo, wp_vf hi) {
  const __m512i l = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(lo))));
  const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(hi))));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// One pair row of Vb for one lane group, at dst (positions vs apart): load_lo(dv) / load_hi(dv) give the d[u][v] of
// channels 2j and 2j + 1 (alone: 2j is the last channel, 2j + 1 reads as zero). The low channel's transform waits in
// a stack buffer (two channels' transforms at once would not fit in the registers).
template <int P, typename Lo, typename Hi>
WINOPRUNE_BF16_TARGET inline void transform_pair(Lo load_lo, Hi load_hi, bool alone, std::uint16_t* dst, index_t vs) {
  alignas(64) float lo[P * P][VW];
  wp_vf dv[P][P];
  load_lo(dv);
  input_tiles<P>(dv, [&](int xi, wp_vf v) { store(lo[xi], v); });
  const auto put = [&](int xi, wp_vf hi) { _mm512_storeu_si512(dst + xi * vs, pack_pair(load(lo[xi]), hi)); };
  if (alone) {
    for (int xi = 0; xi < P * P; ++xi) put(xi, wp_vf{});
    return;
  }
  load_hi(dv);
  input_tiles<P>(dv, put);
}

// Vb pair rows [j0, j1) of one sub-block of `sub` tiles at column col0 of Vb's rows of Tb tiles (channels 2 j0 ..
// 2 j1 - 1; a channel >= C reads as zero).
template <int P>
WINOPRUNE_BF16_TARGET void input_block_bf16(const float* x, const ConvGeometry& g, index_t C, index_t j0, index_t j1,
                                            const TileInfo& ti, index_t sub, index_t col0, index_t Tb,
                                            std::uint16_t* Vb) {
  const index_t plane = g.H * g.W, vs = vb_stride(C, Tb);
  index_t pf[6 * P];
  const int n_pf = 2 * (j1 - j0) > kPrefetchChannels ? prefetch_offsets<P>(g, ti, sub, pf) : 0;
  for (index_t j = j0; j < j1; ++j) {
    const index_t c0 = 2 * j, c1 = 2 * j + 1;
    if (c0 + kPrefetchChannels + 1 < C)
      for (int i = 0; i < n_pf; ++i) {
        __builtin_prefetch(x + (c0 + kPrefetchChannels) * plane + pf[i]);
        __builtin_prefetch(x + (c1 + kPrefetchChannels) * plane + pf[i]);
      }
    for (index_t l0 = 0; l0 < sub; l0 += VW)
      transform_pair<P>([&](wp_vf(&dv)[P][P]) { load_tiles<P>(x + c0 * plane, g, ti, l0, dv); },
                        [&](wp_vf(&dv)[P][P]) { load_tiles<P>(x + c1 * plane, g, ti, l0, dv); }, c1 >= C,
                        Vb + j * Tb * 2 + (col0 + l0) * 2, vs);
  }
}

// ------------------------------------------------------------------------------------------- NHWC bfloat16 I/O
// A deployed bfloat16 model keeps its activations in bfloat16, channels-last (NHWC): the kernel then reads the
// input's channel pairs (2j, 2j + 1) of a pixel as one 32-bit word, already in VNNI order, and writes two output
// channels per 32-bit word. Lanes are tiles, so a pixel of 16 tiles is one gather (or scatter) of 16 words.

// Byte offsets of every tile's top-left input / output pixel, and which output rows / columns each lane writes.
struct NhwcBlock {
  std::int32_t in[2 * VW], out[2 * VW];
  std::uint32_t out_row_bits[2][8], out_col_bits[2][8];
};

template <int P>
inline void nhwc_block(const ConvGeometry& g, index_t C, index_t K, const TileInfo& ti, index_t Tb, NhwcBlock& nb) {
  constexpr int m = P - 2;
  const index_t plane_in = g.H * g.W * C, plane_out = g.Ho * g.Wo * K;
  for (index_t grp = 0; grp * VW < Tb; ++grp)
    for (int a = 0; a < m; ++a) nb.out_row_bits[grp][a] = nb.out_col_bits[grp][a] = 0;
  for (index_t t = 0; t < Tb; ++t) {
    if (t >= ti.nt) {
      nb.in[t] = nb.out[t] = 0;
      continue;
    }
    const index_t n = ti.xbase[t] / (g.H * g.W * C);  // tile_info's xbase: n * C * H * W
    nb.in[t] = static_cast<std::int32_t>(2 * (n * plane_in + (ti.h0[t] * g.W + ti.w0[t]) * C));
    nb.out[t] = static_cast<std::int32_t>(2 * (n * plane_out + (ti.oh0[t] * g.Wo + ti.ow0[t]) * K));
    for (int a = 0; a < m; ++a) {
      if (ti.oh0[t] + a < g.Ho) nb.out_row_bits[t / VW][a] |= 1u << (t % VW);
      if (ti.ow0[t] + a < g.Wo) nb.out_col_bits[t / VW][a] |= 1u << (t % VW);
    }
  }
}

// d[u][v] words (channel pair cbyte / 4 of each tile's pixel) of lane group grp, zero outside the image.
template <int P>
WINOPRUNE_BF16_TARGET inline void gather_pairs(const std::uint8_t* x, const ConvGeometry& g, index_t C,
                                               const TileInfo& ti, const NhwcBlock& nb, index_t grp,
                                               std::int32_t cbyte, __m512i (&w)[P][P]) {
  const __m512i base = _mm512_add_epi32(_mm512_loadu_si512(nb.in + grp * VW), _mm512_set1_epi32(cbyte));
  for (int u = 0; u < P; ++u)
    for (int v = 0; v < P; ++v) {
      const __mmask16 k = static_cast<__mmask16>(ti.row_bits[grp][u] & ti.col_bits[grp][v]);
      const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(2 * (u * g.W + v) * C)));
      w[u][v] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, x, 1);
    }
}

// The last channel of an odd C, alone (a 32-bit read could cross the end of the tensor): scalar reads.
template <int P>
inline void gather_last(const std::uint8_t* x, const ConvGeometry& g, index_t C, const TileInfo& ti,
                        const NhwcBlock& nb, index_t grp, __m512i (&w)[P][P]) {
  alignas(64) std::uint32_t d[P][P][VW];
  for (int u = 0; u < P; ++u)
    for (int v = 0; v < P; ++v)
      for (int l = 0; l < VW; ++l) {
        const index_t t = grp * VW + l;
        const bool ok = (ti.row_bits[grp][u] & ti.col_bits[grp][v]) >> l & 1u;
        std::uint16_t h = 0;
        if (ok) std::memcpy(&h, x + nb.in[t] + 2 * ((u * g.W + v) * C + C - 1), 2);
        d[u][v][l] = h;
      }
  for (int u = 0; u < P; ++u)
    for (int v = 0; v < P; ++v) w[u][v] = _mm512_load_si512(d[u][v]);
}

// Vb pair rows [j0, j1) of one block from an NHWC bfloat16 input.
template <int P>
WINOPRUNE_BF16_TARGET void input_block_nhwc(const std::uint8_t* x, const ConvGeometry& g, index_t C, index_t j0,
                                            index_t j1, const TileInfo& ti, const NhwcBlock& nb, index_t sub,
                                            index_t col0, index_t Tb, std::uint16_t* Vb) {
  const index_t vs = vb_stride(C, Tb);
  const __m512i high_bits = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (index_t j = j0; j < j1; ++j) {
    const bool alone = 2 * j + 1 >= C;  // the last channel of an odd C
    for (index_t l0 = 0; l0 < sub; l0 += VW) {
      __m512i w[P][P];
      if (alone) gather_last<P>(x, g, C, ti, nb, l0 / VW, w);
      else gather_pairs<P>(x, g, C, ti, nb, l0 / VW, static_cast<std::int32_t>(4 * j), w);
      const auto half = [&](wp_vf(&dv)[P][P], bool high) {  // channel 2j (low half) or 2j + 1 (high half)
        for (int u = 0; u < P; ++u)
          for (int v = 0; v < P; ++v)
            dv[u][v] = reinterpret_cast<wp_vf>(high ? _mm512_and_si512(w[u][v], high_bits)
                                                    : _mm512_slli_epi32(w[u][v], 16));
      };
      transform_pair<P>([&](wp_vf(&dv)[P][P]) { half(dv, false); }, [&](wp_vf(&dv)[P][P]) { half(dv, true); }, alone,
                        Vb + j * Tb * 2 + (col0 + l0) * 2, vs);
    }
  }
}

// y for output channel pairs [i0, i1) of one block into an NHWC bfloat16 output (bias and activation in float32).
template <int P, typename Row>
WINOPRUNE_BF16_TARGET void output_block_nhwc(Row row, const ConvGeometry& g, index_t K, index_t i0, index_t i1,
                                             const float* bias, int act, const TileInfo& ti, const NhwcBlock& nb,
                                             std::uint8_t* y) {
  constexpr int m = P - 2;
  for (index_t i = i0; i < i1; ++i) {
    const index_t k0 = 2 * i;
    const bool pair = k0 + 1 < K;
    for (index_t l0 = 0; l0 < ti.nt; l0 += VW) {
      const index_t grp = l0 / VW;
      wp_vf ov[2][m][m];
      for (int h = 0; h < (pair ? 2 : 1); ++h) {
        const float* mrow[P * P];
        channel_rows<P>(row, k0 + h, mrow);
        output_lanes<P>(mrow, l0, splat(bias ? bias[k0 + h] : 0.0f), act, ov[h]);
      }
      const __m512i base = _mm512_loadu_si512(nb.out + l0);
      for (int a = 0; a < m; ++a)
        for (int c = 0; c < m; ++c) {
          const std::uint32_t bits = nb.out_row_bits[grp][a] & nb.out_col_bits[grp][c];
          const std::int32_t off = static_cast<std::int32_t>(2 * ((a * g.Wo + c) * K + k0));
          if (pair) {
            const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(off));
            _mm512_mask_i32scatter_epi32(y, static_cast<__mmask16>(bits), idx, pack_pair(ov[0][a][c], ov[1][a][c]),
                                         1);
            continue;
          }
          alignas(64) float vals[VW];
          store(vals, ov[0][a][c]);
          for (int l = 0; l < VW; ++l)
            if (bits >> l & 1u) {
              const std::uint16_t h = to_bf16(vals[l]);
              std::memcpy(y + nb.out[l0 + l] + off, &h, 2);
            }
        }
    }
  }
}

// The two layouts a bfloat16 forward reads and writes: float32 NCHW, or bfloat16 NHWC.
struct NchwF32Io {
  const float* x;
  float* y;
  struct Block {};
  index_t out_units(index_t K) const { return K; }
  template <int P>
  void block(const ConvGeometry&, index_t, index_t, const TileInfo&, index_t, Block&) const {}
  template <int P>
  void input(const ConvGeometry& g, index_t C, index_t j0, index_t j1, const TileInfo& ti, const Block&, index_t sub,
             index_t col0, index_t Tb, std::uint16_t* Vb) const {
    input_block_bf16<P>(x, g, C, j0, j1, ti, sub, col0, Tb, Vb);
  }
  template <int P, typename Row>
  void output(Row rows, const ConvGeometry& g, index_t, index_t u0, index_t u1, const float* bias, int act,
              const TileInfo& ti, const Block&) const {
    output_block<P>(rows, g, u0, u1, bias, act, ti, y);
  }
};

struct NhwcBf16Io {
  const std::uint8_t* x;
  std::uint8_t* y;
  using Block = NhwcBlock;
  index_t out_units(index_t K) const { return (K + 1) / 2; }
  template <int P>
  void block(const ConvGeometry& g, index_t C, index_t K, const TileInfo& ti, index_t sub, Block& nb) const {
    nhwc_block<P>(g, C, K, ti, sub, nb);
  }
  template <int P>
  void input(const ConvGeometry& g, index_t C, index_t j0, index_t j1, const TileInfo& ti, const Block& nb,
             index_t sub, index_t col0, index_t Tb, std::uint16_t* Vb) const {
    input_block_nhwc<P>(x, g, C, j0, j1, ti, nb, sub, col0, Tb, Vb);
  }
  template <int P, typename Row>
  void output(Row rows, const ConvGeometry& g, index_t K, index_t u0, index_t u1, const float* bias, int act,
              const TileInfo& ti, const Block& nb) const {
    output_block_nhwc<P>(rows, g, K, u0, u1, bias, act, ti, nb, y);
  }
};

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// All eight tiles 16 rows x 64 bytes. One panel: tmm0, tmm1 = C of tile groups 0 and 1, tmm2 = A, tmm3, tmm4 = B
// of tile groups 0 and 1. Two panels: tmm0..tmm3 = C (panel, tile group), tmm4, tmm5 = A, tmm6, tmm7 = B.
WINOPRUNE_AMX_TARGET inline void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not count LDTILECFG as a read of cfg and drops the stores above without this barrier
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

WINOPRUNE_AMX_TARGET inline void amx_end() { _tile_release(); }

// Panel q on AMX: its 16 rows of M over the block's Tb / 16 groups of 16 tiles, two groups at a time (tmm0, tmm1 =
// C of the two groups, tmm2 = A, tmm3, tmm4 = B); A comes from memory once, then from L1.
WINOPRUNE_AMX_TARGET void panel_amx(const WinogradBf16View& pl, index_t q, const std::uint16_t* Vx, float* Mc,
                                    index_t Tb, index_t groups) {
  const index_t row_bytes = Tb * 2 * 2;  // one pair row of Vb
  float* out = Mc + q * kBf16Rows * Tb;
  for (index_t g0 = 0; g0 < groups; g0 += 2) {
    const bool two = g0 + 1 < groups;
    _tile_zero(0);
    if (two) _tile_zero(1);
    for (index_t i = pl.chunk_begin[q]; i < pl.chunk_begin[q + 1]; ++i) {
      const std::uint16_t* b = Vx + static_cast<index_t>(pl.chunks[i]) * (kBf16Chunk / 2) * Tb * 2 + g0 * 2 * VW;
      _tile_loadd(2, pl.A + i * kBf16Rows * kBf16Chunk, 64);
      _tile_loadd(3, b, row_bytes);
      _tile_dpbf16ps(0, 2, 3);
      if (two) {
        _tile_loadd(4, b + 2 * VW, row_bytes);
        _tile_dpbf16ps(1, 2, 4);
      }
    }
    _tile_stored(0, out + g0 * VW, Tb * 4);
    if (two) _tile_stored(1, out + (g0 + 1) * VW, Tb * 4);
  }
}

// Panels q and q + 1 (same position, same kept chunks) on AMX, two tile groups at a time: four independent
// accumulators (tmm0..tmm3), so consecutive TDPBF16PS do not wait for each other, and every B tile serves both
// panels (tmm4, tmm5 = A of the panels, tmm6, tmm7 = B of the groups). `groups` must be even (Tb / 16 is).
WINOPRUNE_AMX_TARGET void panel_pair_amx(const WinogradBf16View& pl, index_t q, const std::uint16_t* Vx, float* Mc,
                                         index_t Tb, index_t groups) {
  const index_t row_bytes = Tb * 2 * 2, n = pl.chunk_begin[q + 1] - pl.chunk_begin[q];
  const std::uint16_t* a0 = pl.A + pl.chunk_begin[q] * kBf16Rows * kBf16Chunk;
  const std::uint16_t* a1 = pl.A + pl.chunk_begin[q + 1] * kBf16Rows * kBf16Chunk;
  float* out = Mc + q * kBf16Rows * Tb;
  for (index_t g0 = 0; g0 < groups; g0 += 2) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (index_t i = 0; i < n; ++i) {
      const std::uint16_t* b =
          Vx + static_cast<index_t>(pl.chunks[pl.chunk_begin[q] + i]) * (kBf16Chunk / 2) * Tb * 2 + g0 * 2 * VW;
      _tile_loadd(4, a0 + i * kBf16Rows * kBf16Chunk, 64);
      _tile_loadd(6, b, row_bytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(5, a1 + i * kBf16Rows * kBf16Chunk, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(7, b + 2 * VW, row_bytes);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out + g0 * VW, Tb * 4);
    _tile_stored(1, out + (g0 + 1) * VW, Tb * 4);
    _tile_stored(2, out + kBf16Rows * Tb + g0 * VW, Tb * 4);
    _tile_stored(3, out + kBf16Rows * Tb + (g0 + 1) * VW, Tb * 4);
  }
}

// Panel q on VDPBF16PS, NV tile groups at a time: H rows per pass, each an accumulator of 16 tiles per group.
template <int NV>
WINOPRUNE_BF16_TARGET void panel_dp(const WinogradBf16View& pl, index_t q, const std::uint16_t* Vx, float* Mc,
                                    index_t Tb, index_t groups) {
  constexpr int H = NV == 1 ? 16 : 8;
  for (index_t g0 = 0; g0 < groups; g0 += NV)
    for (int r0 = 0; r0 < kBf16Rows; r0 += H) {
      __m512 acc[H][NV];
#pragma GCC unroll 16
      for (int r = 0; r < H; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
      for (index_t i = pl.chunk_begin[q]; i < pl.chunk_begin[q + 1]; ++i) {
        const std::uint16_t* a = pl.A + i * kBf16Rows * kBf16Chunk + r0 * kBf16Chunk;
        const std::uint16_t* b = Vx + static_cast<index_t>(pl.chunks[i]) * (kBf16Chunk / 2) * Tb * 2 + g0 * 2 * VW;
        for (int j = 0; j < kBf16Chunk / 2; ++j) {
          __m512bh bv[NV];
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v)
            bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + j * Tb * 2 + v * 2 * VW));
#pragma GCC unroll 16
          for (int r = 0; r < H; ++r) {
            std::int32_t pair;
            std::memcpy(&pair, a + r * kBf16Chunk + 2 * j, 4);
            const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
          }
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < H; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v)
          _mm512_storeu_ps(Mc + (q * kBf16Rows + r0 + r) * Tb + (g0 + v) * VW, acc[r][v]);
    }
}

// groups: the 16-tile groups of the block that hold tiles (a multiple of 2 unless the block is one group).
inline void panel_bf16(bool amx, const WinogradBf16View& pl, index_t q, const std::uint16_t* Vb, float* Mc,
                       index_t Tb, index_t groups) {
  const std::uint16_t* Vx = Vb + pl.panel_xi[q] * vb_stride(pl.C, Tb);
  if (amx) panel_amx(pl, q, Vx, Mc, Tb, groups);
  else if (groups % 2 == 0) panel_dp<2>(pl, q, Vx, Mc, Tb, groups);
  else panel_dp<1>(pl, q, Vx, Mc, Tb, groups);
}

// Whether panels q and q + 1 can run as one pair: the same position and the same kept chunks.
inline bool pairable(const WinogradBf16View& pl, index_t q) {
  if (q + 1 >= pl.n_panels || pl.panel_xi[q] != pl.panel_xi[q + 1]) return false;
  const index_t b0 = pl.chunk_begin[q], b1 = pl.chunk_begin[q + 1], n = b1 - b0;
  if (pl.chunk_begin[q + 2] - b1 != n) return false;
  for (index_t i = 0; i < n; ++i)
    if (pl.chunks[b0 + i] != pl.chunks[b1 + i]) return false;
  return true;
}

// GEMM work item w: panels 2w and 2w + 1, as one AMX pair where they can be.
inline void gemm_item_bf16(bool amx, const WinogradBf16View& pl, index_t w, const std::uint16_t* Vb, float* Mc,
                           index_t Tb, index_t groups) {
  const index_t q = 2 * w;
  if (amx && groups % 2 == 0 && pairable(pl, q)) {
    panel_pair_amx(pl, q, Vb + pl.panel_xi[q] * vb_stride(pl.C, Tb), Mc, Tb, groups);
    return;
  }
  panel_bf16(amx, pl, q, Vb, Mc, Tb, groups);
  if (q + 1 < pl.n_panels) panel_bf16(amx, pl, q + 1, Vb, Mc, Tb, groups);
}

// The compacted M through the plan's row map (rows of Tb floats, a sub-block's tiles from column col0).
struct MappedRows {
  const float* Mc;
  const index_t* row_map;
  index_t K, Tb, zero_row;
  const float* operator()(int xi, index_t k) const {
    const index_t r = row_map[xi * K + k];
    return Mc + (r < 0 ? zero_row : r) * Tb;
  }
};

template <int P, typename Io>
void forward_bf16_private(const WinogradBf16View& pl, const ConvGeometry& g, const Bf16Layout& L, const Io& io,
                          float* ws, bool amx, int threads, StageSeconds* st) {
#pragma omp parallel num_threads(threads)
  {
#if defined(_OPENMP)
    const index_t tid = omp_get_thread_num();
#else
    const index_t tid = 0;
#endif
    const Bf16Slot s = bf16_slot(ws, L, tid);
    bf16_clear(pl, L, s);
    if (amx) amx_begin();
    const MappedRows rows{s.Mc, pl.row_map, pl.K, L.Tb, L.mc_rows - 1};
    TileInfo ti;
    typename Io::Block blk;
    StageClock clk(st != nullptr);
    double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
#pragma omp for schedule(static)
    for (index_t b = 0; b < L.blocks; ++b) {
      clk.lap();
      tile_info<P>(g, pl.C, pl.K, L.th, L.tw, b * L.Tb, L.sub, L.T, ti);
      io.template block<P>(g, pl.C, pl.K, ti, L.sub, blk);
      io.template input<P>(g, pl.C, 0, (pl.C + 1) / 2, ti, blk, L.sub, 0, L.Tb, s.Vb);
      t_in += clk.lap();
      for (index_t w = 0; w < (pl.n_panels + 1) / 2; ++w) gemm_item_bf16(amx, pl, w, s.Vb, s.Mc, L.Tb, L.nv);
      t_gemm += clk.lap();
      io.template output<P>(rows, g, pl.K, 0, io.out_units(pl.K), pl.bias, pl.act, ti, blk);
      t_out += clk.lap();
    }
    if (amx) amx_end();
    add_stages(st, t_in, t_gemm, t_out);
  }
}

// Few sub-blocks: the threads share each block (up to kMaxSubs sub-blocks) and split its stages.
template <int P, typename Io>
void forward_bf16_shared(const WinogradBf16View& pl, const ConvGeometry& g, const Bf16Layout& L, const Io& io,
                         float* ws, bool amx, int threads, StageSeconds* st) {
  const Bf16Slot s = bf16_slot(ws, L, 0);
  bf16_clear(pl, L, s);
  const index_t pairs = (pl.C + 1) / 2, units = io.out_units(pl.K), items = (pl.n_panels + 1) / 2;
  TileInfo tis[kMaxSubs];
  typename Io::Block blks[kMaxSubs];
#pragma omp parallel num_threads(threads)
  {
    if (amx) amx_begin();
    StageClock clk(st != nullptr);
    double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
    for (index_t b = 0; b < L.blocks; ++b) {
      clk.lap();
      const index_t first = b * L.Tb, subs = std::min(L.subs, (L.T - first + L.sub - 1) / L.sub);
      const index_t groups = subs * L.nv;
#pragma omp for schedule(static)
      for (index_t u = 0; u < subs; ++u) {
        tile_info<P>(g, pl.C, pl.K, L.th, L.tw, first + u * L.sub, L.sub, L.T, tis[u]);
        io.template block<P>(g, pl.C, pl.K, tis[u], L.sub, blks[u]);
      }
#pragma omp for schedule(static)
      for (index_t w = 0; w < subs * pairs; ++w)
        io.template input<P>(g, pl.C, w % pairs, w % pairs + 1, tis[w / pairs], blks[w / pairs], L.sub,
                             (w / pairs) * L.sub, L.Tb, s.Vb);
      t_in += clk.lap();
#pragma omp for schedule(dynamic, 1)
      for (index_t w = 0; w < items; ++w) gemm_item_bf16(amx, pl, w, s.Vb, s.Mc, L.Tb, groups);
      t_gemm += clk.lap();
#pragma omp for schedule(static)
      for (index_t w = 0; w < subs * units; ++w) {
        const index_t u = w / units;
        const MappedRows rows{s.Mc + u * L.sub, pl.row_map, pl.K, L.Tb, L.mc_rows - 1};
        io.template output<P>(rows, g, pl.K, w % units, w % units + 1, pl.bias, pl.act, tis[u], blks[u]);
      }
      t_out += clk.lap();
    }
    if (amx) amx_end();
    add_stages(st, t_in, t_gemm, t_out);
  }
}

}  // namespace winograd_bf16_detail

inline index_t winograd_bf16_workspace(const WinogradBf16View& pl, const ConvGeometry& g, int threads) {
  const auto L = winograd_bf16_detail::bf16_layout(pl, g, std::max(threads, 1));
  return L.slots * L.slot_floats;
}

// x, y: float32 NCHW, or (nhwc) bfloat16 NHWC whose byte offsets fit in int32 (the caller checks).
// Throws std::invalid_argument on path none or a too-small workspace; the caller checks the CPU supports `path`.
inline void winograd_bf16_forward(const WinogradBf16View& pl, const ConvGeometry& g, const void* x, void* y,
                                  bool nhwc, float* workspace, index_t workspace_size, int threads, Bf16Path path,
                                  StageSeconds* stages) {
  using namespace winograd_bf16_detail;
  if (path != Bf16Path::amx && path != Bf16Path::avx512bf16) throw std::invalid_argument("no bfloat16 path given");
  threads = std::max(threads, 1);
  const Bf16Layout L = bf16_layout(pl, g, threads);
  if (workspace_size < L.slots * L.slot_floats) throw std::invalid_argument("workspace too small");
  const bool amx = path == Bf16Path::amx;
  const NchwF32Io f32{static_cast<const float*>(x), static_cast<float*>(y)};
  const NhwcBf16Io b16{static_cast<const std::uint8_t*>(x), static_cast<std::uint8_t*>(y)};
#define WINOPRUNE_BF16_IO(P, IO)                                                \
  (L.shared ? forward_bf16_shared<P>(pl, g, L, IO, workspace, amx, threads, stages) \
            : forward_bf16_private<P>(pl, g, L, IO, workspace, amx, threads, stages))
#define WINOPRUNE_BF16_FWD(P) (nhwc ? WINOPRUNE_BF16_IO(P, b16) : WINOPRUNE_BF16_IO(P, f32))
  if (pl.p == 4) {
    WINOPRUNE_BF16_FWD(4);
  } else if (pl.p == 6) {
    WINOPRUNE_BF16_FWD(6);
  } else {
    throw std::invalid_argument("only F(2,3) and F(4,3) have native kernels (p = 4 or 6)");
  }
#undef WINOPRUNE_BF16_FWD
#undef WINOPRUNE_BF16_IO
}
