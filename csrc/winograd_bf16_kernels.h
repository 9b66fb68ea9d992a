// Winograd convolution F(m x m, 3 x 3) with a bfloat16 multiply: float32 in and out, float32 transforms and sums.
//
// Included only by kernels_isa.cpp in the avx512 build (VW = 16), after winograd_conv_kernels.h, whose tile blocks,
// transforms and output stage it shares. The bfloat16 and AMX instructions are enabled per function (target
// attributes), so nothing else in the build can use them and the extension still loads on any x86-64 CPU; the
// caller runs a path only where detect_bf16() found it (CPU flags, and for AMX the tile state granted by Linux).
//
// Per block of Tb = 16 or 32 tiles:
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

struct Bf16Layout {
  index_t T, th, tw, Tb, blocks;
  int nv;
  bool shared;
  index_t vb_floats, mc_rows, mc_floats, slot_floats, slots;
};

inline Bf16Layout bf16_layout(const WinogradBf16View& pl, const ConvGeometry& g, int threads) {
  Bf16Layout L{};
  L.th = (g.Ho + pl.m - 1) / pl.m;
  L.tw = (g.Wo + pl.m - 1) / pl.m;
  L.T = g.N * L.th * L.tw;
  L.nv = L.T <= VW ? 1 : 2;
  L.Tb = L.nv * VW;
  L.blocks = (L.T + L.Tb - 1) / L.Tb;
  L.shared = threads > 1 && L.blocks < 4 * static_cast<index_t>(threads);
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p;
  L.vb_floats = (P2 * vb_stride(pl.C, L.Tb) + 1) / 2;
  L.mc_rows = pl.n_panels * kBf16Rows + 1;  // the last row stays zero: pruned (xi, k) read it
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
  for (index_t xi = 0; xi < P2; ++xi)
    std::memset(s.Vb + xi * vb_stride(pl.C, L.Tb) + first * L.Tb * 2, 0, sizeof(std::uint16_t) * (last - first) * L.Tb * 2);
  std::memset(s.Mc + (L.mc_rows - 1) * L.Tb, 0, sizeof(float) * L.Tb);
}

// Lane l of the result: bfloat16(hi[l]) << 16 | bfloat16(lo[l]), i.e. the pair (lo, hi) of tile l in VNNI order.
WINOPRUNE_BF16_TARGET inline __m512i pack_pair(wp_vf lo, wp_vf hi) {
  const __m512i l = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(lo))));
  const __m512i h = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(hi))));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// Vb pair rows [j0, j1) of one block (channels 2 j0 .. 2 j1 - 1; a channel >= C reads as zero).
template <int P>
WINOPRUNE_BF16_TARGET void input_block_bf16(const float* x, const ConvGeometry& g, index_t C, index_t j0, index_t j1,
                                            const TileInfo& ti, index_t Tb, std::uint16_t* Vb) {
  constexpr int P2 = P * P;
  const index_t plane = g.H * g.W, vs = vb_stride(C, Tb);
  index_t pf[6 * P];
  const int n_pf = 2 * (j1 - j0) > kPrefetchChannels ? prefetch_offsets<P>(g, ti, Tb, pf) : 0;
  for (index_t j = j0; j < j1; ++j) {
    const index_t c0 = 2 * j, c1 = 2 * j + 1;
    if (c0 + kPrefetchChannels + 1 < C)
      for (int i = 0; i < n_pf; ++i) {
        __builtin_prefetch(x + (c0 + kPrefetchChannels) * plane + pf[i]);
        __builtin_prefetch(x + (c1 + kPrefetchChannels) * plane + pf[i]);
      }
    for (index_t l0 = 0; l0 < Tb; l0 += VW) {
      alignas(64) float lo[P2][VW];
      wp_vf dv[P][P];
      load_tiles<P>(x + c0 * plane, g, ti, l0, dv);
      input_tiles<P>(dv, [&](int xi, wp_vf v) { store(lo[xi], v); });
      std::uint16_t* dst = Vb + j * Tb * 2 + l0 * 2;
      const auto put = [&](int xi, wp_vf hi) {
        _mm512_storeu_si512(dst + xi * vs, pack_pair(load(lo[xi]), hi));
      };
      if (c1 < C) {
        load_tiles<P>(x + c1 * plane, g, ti, l0, dv);
        input_tiles<P>(dv, put);
      } else {
        for (int xi = 0; xi < P2; ++xi) put(xi, wp_vf{});
      }
    }
  }
}

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// tmm0, tmm1: C of tile groups 0 and 1; tmm2: A; tmm3, tmm4: B of tile groups 0 and 1. All 16 rows x 64 bytes.
WINOPRUNE_AMX_TARGET inline void amx_begin() {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not count LDTILECFG as a read of cfg and drops the stores above without this barrier
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

WINOPRUNE_AMX_TARGET inline void amx_end() { _tile_release(); }

// Panel q on AMX: its 16 rows of M for the block's NV groups of 16 tiles.
template <int NV>
WINOPRUNE_AMX_TARGET void panel_amx(const WinogradBf16View& pl, index_t q, const std::uint16_t* Vx, float* Mc,
                                    index_t Tb) {
  const index_t row_bytes = Tb * 2 * 2;  // one pair row of Vb
  _tile_zero(0);
  if (NV == 2) _tile_zero(1);
  for (index_t i = pl.chunk_begin[q]; i < pl.chunk_begin[q + 1]; ++i) {
    const std::uint16_t* b = Vx + static_cast<index_t>(pl.chunks[i]) * (kBf16Chunk / 2) * Tb * 2;
    _tile_loadd(2, pl.A + i * kBf16Rows * kBf16Chunk, 64);
    _tile_loadd(3, b, row_bytes);
    _tile_dpbf16ps(0, 2, 3);
    if (NV == 2) {
      _tile_loadd(4, b + 2 * VW, row_bytes);
      _tile_dpbf16ps(1, 2, 4);
    }
  }
  float* out = Mc + q * kBf16Rows * Tb;
  _tile_stored(0, out, Tb * 4);
  if (NV == 2) _tile_stored(1, out + VW, Tb * 4);
}

// Panel q on VDPBF16PS: H rows at a time, each an accumulator of 16 tiles per tile group.
template <int NV>
WINOPRUNE_BF16_TARGET void panel_dp(const WinogradBf16View& pl, index_t q, const std::uint16_t* Vx, float* Mc,
                                    index_t Tb) {
  constexpr int H = NV == 1 ? 16 : 8;
  for (int r0 = 0; r0 < kBf16Rows; r0 += H) {
    __m512 acc[H][NV];
#pragma GCC unroll 16
    for (int r = 0; r < H; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (index_t i = pl.chunk_begin[q]; i < pl.chunk_begin[q + 1]; ++i) {
      const std::uint16_t* a = pl.A + i * kBf16Rows * kBf16Chunk + r0 * kBf16Chunk;
      const std::uint16_t* b = Vx + static_cast<index_t>(pl.chunks[i]) * (kBf16Chunk / 2) * Tb * 2;
      for (int j = 0; j < kBf16Chunk / 2; ++j) {
        __m512bh bv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + j * Tb * 2 + v * 2 * VW));
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
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(Mc + (q * kBf16Rows + r0 + r) * Tb + v * VW, acc[r][v]);
  }
}

template <int NV>
inline void panel_bf16(bool amx, const WinogradBf16View& pl, index_t q, const std::uint16_t* Vb, float* Mc,
                       index_t Tb) {
  const std::uint16_t* Vx = Vb + pl.panel_xi[q] * vb_stride(pl.C, Tb);
  if (amx) panel_amx<NV>(pl, q, Vx, Mc, Tb);
  else panel_dp<NV>(pl, q, Vx, Mc, Tb);
}

// The compacted M through the plan's row map.
struct MappedRows {
  const float* Mc;
  const index_t* row_map;
  index_t K, Tb, zero_row;
  const float* operator()(int xi, index_t k) const {
    const index_t r = row_map[xi * K + k];
    return Mc + (r < 0 ? zero_row : r) * Tb;
  }
};

template <int P, int NV>
void forward_bf16_private(const WinogradBf16View& pl, const ConvGeometry& g, const Bf16Layout& L, const float* x,
                          float* y, float* ws, bool amx, int threads, StageSeconds* st) {
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
    StageClock clk(st != nullptr);
    double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
#pragma omp for schedule(static)
    for (index_t b = 0; b < L.blocks; ++b) {
      clk.lap();
      tile_info<P>(g, pl.C, pl.K, L.th, L.tw, b * L.Tb, L.Tb, L.T, ti);
      input_block_bf16<P>(x, g, pl.C, 0, (pl.C + 1) / 2, ti, L.Tb, s.Vb);
      t_in += clk.lap();
      for (index_t q = 0; q < pl.n_panels; ++q) panel_bf16<NV>(amx, pl, q, s.Vb, s.Mc, L.Tb);
      t_gemm += clk.lap();
      output_block<P>(rows, g, 0, pl.K, pl.bias, pl.act, ti, y);
      t_out += clk.lap();
    }
    if (amx) amx_end();
    add_stages(st, t_in, t_gemm, t_out);
  }
}

// Few blocks: the threads share one block at a time and split each stage.
template <int P, int NV>
void forward_bf16_shared(const WinogradBf16View& pl, const ConvGeometry& g, const Bf16Layout& L, const float* x,
                         float* y, float* ws, bool amx, int threads, StageSeconds* st) {
  const Bf16Slot s = bf16_slot(ws, L, 0);
  bf16_clear(pl, L, s);
  const MappedRows rows{s.Mc, pl.row_map, pl.K, L.Tb, L.mc_rows - 1};
  const index_t pairs = (pl.C + 1) / 2;
#pragma omp parallel num_threads(threads)
  {
    if (amx) amx_begin();
    TileInfo ti;
    StageClock clk(st != nullptr);
    double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
    for (index_t b = 0; b < L.blocks; ++b) {
      clk.lap();
      tile_info<P>(g, pl.C, pl.K, L.th, L.tw, b * L.Tb, L.Tb, L.T, ti);
#pragma omp for schedule(static)
      for (index_t j = 0; j < pairs; ++j) input_block_bf16<P>(x, g, pl.C, j, j + 1, ti, L.Tb, s.Vb);
      t_in += clk.lap();
#pragma omp for schedule(dynamic, 2)
      for (index_t q = 0; q < pl.n_panels; ++q) panel_bf16<NV>(amx, pl, q, s.Vb, s.Mc, L.Tb);
      t_gemm += clk.lap();
#pragma omp for schedule(static)
      for (index_t k = 0; k < pl.K; ++k) output_block<P>(rows, g, k, k + 1, pl.bias, pl.act, ti, y);
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

// Throws std::invalid_argument on path none or a too-small workspace; the caller checks the CPU supports `path`.
inline void winograd_bf16_forward(const WinogradBf16View& pl, const ConvGeometry& g, const float* x, float* y,
                                  float* workspace, index_t workspace_size, int threads, Bf16Path path,
                                  StageSeconds* stages) {
  using namespace winograd_bf16_detail;
  if (path != Bf16Path::amx && path != Bf16Path::avx512bf16) throw std::invalid_argument("no bfloat16 path given");
  threads = std::max(threads, 1);
  const Bf16Layout L = bf16_layout(pl, g, threads);
  if (workspace_size < L.slots * L.slot_floats) throw std::invalid_argument("workspace too small");
  const bool amx = path == Bf16Path::amx;
#define WINOPRUNE_BF16_FWD(P, NV)                                                        \
  (L.shared ? forward_bf16_shared<P, NV>(pl, g, L, x, y, workspace, amx, threads, stages) \
            : forward_bf16_private<P, NV>(pl, g, L, x, y, workspace, amx, threads, stages))
  if (pl.p == 4) {
    if (L.nv == 1) WINOPRUNE_BF16_FWD(4, 1); else WINOPRUNE_BF16_FWD(4, 2);
  } else if (pl.p == 6) {
    if (L.nv == 1) WINOPRUNE_BF16_FWD(6, 1); else WINOPRUNE_BF16_FWD(6, 2);
  } else {
    throw std::invalid_argument("only F(2,3) and F(4,3) have native kernels (p = 4 or 6)");
  }
#undef WINOPRUNE_BF16_FWD
}
