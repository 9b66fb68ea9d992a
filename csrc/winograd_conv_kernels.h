// Winograd convolution F(m x m, 3 x 3) from packed Winograd-domain weights: dense, structured-sparse and CSR.
//
// Included only by kernels_isa.cpp, inside one ISA namespace per compilation (see isa.h); VW (floats per vector)
// and MR (panel height) come from there. Torch-free, raw pointers.
//
// Per block of Tb tiles (Tb = VW or 2 * VW, so a block row is one or two vector registers):
//   1. input transform   V[xi][c][t] = (B^T d_t B)[xi]           (P2, C, Tb)   gathered from NCHW x, zero outside
//   2. per-xi GEMM       M[xi][k][t] = sum_c U[xi][k][c] V[xi][c][t] (P2, K+1, Tb) only kept panels/columns run
//   3. output transform  y_t = A^T M_t A (+ bias), cropped into NCHW y
// so the intermediates of a block stay in L1/L2. Rows of M that no panel writes (pruned rows) are zeroed once per
// call; row K is a scratch row that the padding rows of the last panel write into.
//
// Many blocks: each thread runs whole blocks with private buffers (no synchronisation). Few blocks (small maps,
// batch 1): the threads share one block and split its three stages (channels, panels, output channels).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstring>

#include "isa.h"

typedef float wp_vf __attribute__((vector_size(VW * 4)));
typedef float wp_vfu __attribute__((vector_size(VW * 4), aligned(4), __may_alias__));

namespace winograd_detail {

inline wp_vf load(const float* p) { return *reinterpret_cast<const wp_vfu*>(p); }
inline void store(float* p, wp_vf v) { *reinterpret_cast<wp_vfu*>(p) = v; }
inline wp_vf splat(float s) { return s - wp_vf{}; }  // x - 0 == x exactly, so this folds to a broadcast

// The transform matrices of lightning_winoprune/winograd/_transforms.py (exact in float32; a test compares them).
template <int P>
struct Mats;
template <>
struct Mats<4> {
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, 1}};
};
template <>
struct Mats<6> {
  static constexpr float BT[6][6] = {{1, -1.5f, -2, 1.5f, 1, 0},   {0, -1, 0.5f, 2.5f, 1, 0},
                                     {0, -1, 2.5f, -0.5f, -1, 0},  {0, 2, 1, -2, -1, 0},
                                     {0, 0.5f, -1, -0.5f, 1, 0},   {0, 1, -1.5f, -2, 1.5f, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0}, {0, 1, -1, 0.125f, -8, 1}};
};

// (init +) sum_k c[k] * x(k) for a row c of a transform matrix: after unrolling c[k] is a constant, so zero
// coefficients vanish and +-1 need no multiply. Without init the first kept term starts the sum (no add of zero).
// Every stage of the input and output transforms is this, row by row.
template <int N, typename X>
inline wp_vf combine(const float (&c)[N], X x, const wp_vf* init = nullptr) {
  wp_vf s = init ? *init : wp_vf{};
  bool first = init == nullptr;
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) {
    if (c[k] == 0.0f) continue;
    const wp_vf v = x(k);
    const wp_vf term = c[k] == 1.0f ? v : (c[k] == -1.0f ? -v : c[k] * v);
    s = first ? term : s + term;
    first = false;
  }
  return s;
}

// The fused activation on one vector (act is constant per call, so the branch predicts perfectly).
inline wp_vf activate(wp_vf v, int act) {
  const wp_vf zero{};
  switch (act) {
    case act_relu:
      return v > zero ? v : zero;
    case act_relu6: {
      const wp_vf six = splat(6.0f), r = v > zero ? v : zero;
      return r < six ? r : six;
    }
    case act_hardswish: {
      const wp_vf six = splat(6.0f), t = v + splat(3.0f);
      const wp_vf c = t > zero ? (t < six ? t : six) : zero;
      return v * c * splat(1.0f / 6.0f);
    }
    case act_silu: {
      wp_vf r;
      for (int l = 0; l < VW; ++l) r[l] = v[l] / (1.0f + std::exp(-v[l]));
      return r;
    }
    default:
      return v;
  }
}

struct TileInfo {
  index_t nt;                 // valid tiles in the block (<= Tb); lanes beyond read zeros and are not stored
  bool gather_ok;             // every offset below fits in int32 (the gather path's index type)
  std::int32_t goff[2 * VW];  // xbase + h0 * W + w0: the tile's top-left input pixel relative to channel c's plane
  std::uint32_t row_bits[2][8], col_bits[2][8];  // per lane group, bit l set when row h0 + u / column w0 + v is inside
  // per lane group: its VW tiles are consecutive in one tile row and far enough inside the image that the input
  // can be read with contiguous vector loads (in_run) / the output written with contiguous vector stores (out_run)
  bool in_run[2], out_run[2];
  index_t xbase[2 * VW];      // offset of the tile's top-left input pixel inside its image's channel plane + n*C*H*W
  index_t h0[2 * VW], w0[2 * VW];
  index_t ybase[2 * VW];      // n * K * Ho * Wo + (ty * m) * Wo + tx * m
  index_t oh0[2 * VW], ow0[2 * VW];
};

template <int P>
void tile_info(const ConvGeometry& g, index_t C, index_t K, index_t th, index_t tw, index_t t0, index_t Tb,
               index_t T, TileInfo& ti) {
  constexpr int m = P - 2;
  ti.nt = std::min(Tb, T - t0);
  for (index_t l = 0; l < ti.nt; ++l) {
    const index_t t = t0 + l, n = t / (th * tw), r = t % (th * tw), ty = r / tw, tx = r % tw;
    ti.h0[l] = ty * m - g.pad_top;
    ti.w0[l] = tx * m - g.pad_left;
    ti.xbase[l] = n * C * g.H * g.W;
    ti.oh0[l] = ty * m;
    ti.ow0[l] = tx * m;
    ti.ybase[l] = n * K * g.Ho * g.Wo + ty * m * g.Wo + tx * m;
  }
  const index_t last = ti.nt ? ti.xbase[ti.nt - 1] + (ti.h0[ti.nt - 1] + P) * g.W : 0;
  ti.gather_ok = last < INT32_MAX && (C - 1) * g.H * g.W < INT32_MAX;
  for (index_t grp = 0; grp * VW < Tb; ++grp) {
    const index_t f = grp * VW, e = f + VW - 1;
    const bool run = e < ti.nt && ti.xbase[f] == ti.xbase[e] && ti.h0[f] == ti.h0[e] && ti.w0[e] - ti.w0[f] == m * (VW - 1);
    ti.in_run[grp] = run && ti.h0[f] >= 0 && ti.h0[f] + P <= g.H && ti.w0[f] >= 0 && ti.w0[f] + m * VW + m <= g.W;
    ti.out_run[grp] = run && ti.oh0[f] + m <= g.Ho && ti.ow0[f] + m * VW <= g.Wo;
    for (int u = 0; u < P; ++u) ti.row_bits[grp][u] = ti.col_bits[grp][u] = 0;
    for (index_t l = 0; l < VW; ++l) {
      const index_t t = grp * VW + l;
      if (t >= ti.nt) {
        ti.goff[t] = 0;
        continue;
      }
      ti.goff[t] = static_cast<std::int32_t>(ti.gather_ok ? ti.xbase[t] + ti.h0[t] * g.W + ti.w0[t] : 0);
      for (int u = 0; u < P; ++u) {
        if (ti.h0[t] + u >= 0 && ti.h0[t] + u < g.H) ti.row_bits[grp][u] |= 1u << l;
        if (ti.w0[t] + u >= 0 && ti.w0[t] + u < g.W) ti.col_bits[grp][u] |= 1u << l;
      }
    }
  }
}

// d[u][v] for the VW tiles of lane group grp of channel plane xc, by hardware gathers (zero outside the image).
template <int P>
inline bool gather_tiles(const float* xc, const ConvGeometry& g, const TileInfo& ti, index_t grp, wp_vf (&dv)[P][P]) {
#if WINOPRUNE_ISA_ID == 2
  if (!ti.gather_ok) return false;
  const __m512i base = _mm512_loadu_si512(ti.goff + grp * VW);
  for (int u = 0; u < P; ++u)
    for (int v = 0; v < P; ++v) {
      const __mmask16 k = static_cast<__mmask16>(ti.row_bits[grp][u] & ti.col_bits[grp][v]);
      const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int>(u * g.W + v)));
      dv[u][v] = reinterpret_cast<wp_vf>(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, xc, 4));
    }
  return true;
#elif WINOPRUNE_ISA_ID == 1
  if (!ti.gather_ok) return false;
  const __m256i base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ti.goff + grp * VW));
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int u = 0; u < P; ++u)
    for (int v = 0; v < P; ++v) {
      const int bits = static_cast<int>(ti.row_bits[grp][u] & ti.col_bits[grp][v]);
      const __m256i sel = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), lane_bit), lane_bit);
      const __m256i idx = _mm256_add_epi32(base, _mm256_set1_epi32(static_cast<int>(u * g.W + v)));
      dv[u][v] = reinterpret_cast<wp_vf>(
          _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xc, idx, _mm256_castsi256_ps(sel), 4));
    }
  return true;
#else
  (void)xc, (void)g, (void)ti, (void)grp, (void)dv;
  return false;
#endif
}

typedef int wp_vi __attribute__((vector_size(VW * 4)));

// Shuffle masks: even / odd elements of two concatenated vectors, and the interleave of their low / high halves.
struct Masks {
  wp_vi even, odd, ilo, ihi;
  Masks() {
    for (int i = 0; i < VW; ++i) {
      even[i] = 2 * i;
      odd[i] = 2 * i + 1;
      ilo[i] = (i % 2 == 0) ? i / 2 : VW + i / 2;
      ihi[i] = (i % 2 == 0) ? VW / 2 + i / 2 : VW + VW / 2 + i / 2;
    }
  }
};

inline const Masks& masks() {
  static const Masks mk;
  return mk;
}

// d[u][v] of VW tiles that sit side by side in one tile row: element (u, v) of lane l is src[u * W + m * l + v].
// Contiguous loads de-interleaved with shuffles (stride m = 2 or 4) instead of gathers.
template <int P>
inline void load_run(const float* src, index_t W, wp_vf (&dv)[P][P]) {
  const Masks& mk = masks();
  for (int u = 0; u < P; ++u) {
    const float* r = src + u * W;
    if constexpr (P == 4) {
      const wp_vf a = load(r), b = load(r + VW), a2 = load(r + 2), b2 = load(r + 2 + VW);
      dv[u][0] = __builtin_shuffle(a, b, mk.even);
      dv[u][1] = __builtin_shuffle(a, b, mk.odd);
      dv[u][2] = __builtin_shuffle(a2, b2, mk.even);
      dv[u][3] = __builtin_shuffle(a2, b2, mk.odd);
    } else {
      static_assert(P == 6, "stride-4 runs need P = 6");
      for (int half = 0; half < 2; ++half) {  // columns v = 0..3 from offset 0, then v = 4, 5 from offset 4
        const float* o = r + 4 * half;
        const wp_vf q0 = load(o), q1 = load(o + VW), q2 = load(o + 2 * VW), q3 = load(o + 3 * VW);
        const wp_vf e01 = __builtin_shuffle(q0, q1, mk.even), e23 = __builtin_shuffle(q2, q3, mk.even);
        const wp_vf o01 = __builtin_shuffle(q0, q1, mk.odd), o23 = __builtin_shuffle(q2, q3, mk.odd);
        dv[u][4 * half] = __builtin_shuffle(e01, e23, mk.even);
        dv[u][4 * half + 1] = __builtin_shuffle(o01, o23, mk.even);
        if (half == 0) {
          dv[u][2] = __builtin_shuffle(e01, e23, mk.odd);
          dv[u][3] = __builtin_shuffle(o01, o23, mk.odd);
        }
      }
    }
  }
}

// Writes out[a][c] of VW side-by-side full tiles: lane l goes to dst[a * Wo + m * l + c] (interleaving shuffles).
template <int m>
inline void store_run(const wp_vf (&out)[m][m], float* dst, index_t Wo) {
  const Masks& mk = masks();
  for (int a = 0; a < m; ++a) {
    float* r = dst + a * Wo;
    if constexpr (m == 2) {
      store(r, __builtin_shuffle(out[a][0], out[a][1], mk.ilo));
      store(r + VW, __builtin_shuffle(out[a][0], out[a][1], mk.ihi));
    } else {
      static_assert(m == 4, "runs need m = 2 or 4");
      const wp_vf plo = __builtin_shuffle(out[a][0], out[a][2], mk.ilo), phi = __builtin_shuffle(out[a][0], out[a][2], mk.ihi);
      const wp_vf qlo = __builtin_shuffle(out[a][1], out[a][3], mk.ilo), qhi = __builtin_shuffle(out[a][1], out[a][3], mk.ihi);
      store(r, __builtin_shuffle(plo, qlo, mk.ilo));
      store(r + VW, __builtin_shuffle(plo, qlo, mk.ihi));
      store(r + 2 * VW, __builtin_shuffle(phi, qhi, mk.ilo));
      store(r + 3 * VW, __builtin_shuffle(phi, qhi, mk.ihi));
    }
  }
}

// d[u][v] of the VW tiles of lane group l0 / VW of channel plane xc: contiguous loads for a run inside the image,
// else hardware gathers, else scalar reads; zero outside the image and in lanes beyond ti.nt.
template <int P>
inline void load_tiles(const float* xc, const ConvGeometry& g, const TileInfo& ti, index_t l0, wp_vf (&dv)[P][P]) {
  if (ti.in_run[l0 / VW]) {
    load_run<P>(xc + ti.xbase[l0] + ti.h0[l0] * g.W + ti.w0[l0], g.W, dv);
    return;
  }
  if (gather_tiles<P>(xc, g, ti, l0 / VW, dv)) return;
  alignas(64) float d[P][P][VW];
  for (int l = 0; l < VW; ++l) {
    const index_t t = l0 + l;
    if (t >= ti.nt) {
      for (int u = 0; u < P; ++u)
        for (int v = 0; v < P; ++v) d[u][v][l] = 0.0f;
      continue;
    }
    const index_t h0 = ti.h0[t], w0 = ti.w0[t];
    const float* xt = xc + ti.xbase[t];
    if (h0 >= 0 && w0 >= 0 && h0 + P <= g.H && w0 + P <= g.W) {
      const float* src = xt + h0 * g.W + w0;
#pragma GCC unroll 8
      for (int u = 0; u < P; ++u)
#pragma GCC unroll 8
        for (int v = 0; v < P; ++v) d[u][v][l] = src[u * g.W + v];
    } else {
      for (int u = 0; u < P; ++u) {
        const index_t h = h0 + u;
        const bool row_ok = h >= 0 && h < g.H;
        for (int v = 0; v < P; ++v) {
          const index_t w = w0 + v;
          d[u][v][l] = (row_ok && w >= 0 && w < g.W) ? xt[h * g.W + w] : 0.0f;
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < P; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < P; ++v) dv[u][v] = load(d[u][v]);
}

// tmp = B^T d B of VW tiles at once; calls store(i * P + j, value) for every Winograd position.
template <int P, typename Store>
inline void input_tiles(const wp_vf (&dv)[P][P], Store store_xi) {
  wp_vf tmp[P][P];
#pragma GCC unroll 8
  for (int i = 0; i < P; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < P; ++v) tmp[i][v] = combine(Mats<P>::BT[i], [&](int u) { return dv[u][v]; });
#pragma GCC unroll 8
  for (int i = 0; i < P; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) store_xi(i * P + j, combine(Mats<P>::BT[j], [&](int v) { return tmp[i][v]; }));
}

// How many channels ahead input_block asks for the input rows it will read: a block reads P rows of every channel
// plane, hundreds of separate streams that the hardware prefetchers do not follow.
constexpr index_t kPrefetchChannels = 4;

// The offsets, inside a channel plane, of the P input rows of every lane group's first, middle and last tile: what
// input_block prefetches kPrefetchChannels planes ahead (the lines between them follow from the same rows when a
// group is a run). The same for every channel, so computed once per block. Returns how many it wrote.
template <int P>
inline int prefetch_offsets(const ConvGeometry& g, const TileInfo& ti, index_t Tb, index_t (&off)[6 * P]) {
  int n = 0;
  for (index_t l0 = 0; l0 < Tb && l0 < ti.nt; l0 += VW) {
    const index_t last = std::min<index_t>(l0 + VW, ti.nt) - 1;
    for (const index_t t : {l0, (l0 + last) / 2, last}) {
      const index_t h0 = std::max<index_t>(ti.h0[t], 0), w0 = std::max<index_t>(ti.w0[t], 0);
      for (int u = 0; u < P; ++u) off[n++] = ti.xbase[t] + std::min<index_t>(h0 + u, g.H - 1) * g.W + w0;
    }
  }
  return n;
}

// V's stride between Winograd positions: C * Tb floats and one cache line more. With C and Tb powers of two the plain
// stride is a multiple of 4 KiB, so the P*P rows a channel writes (and the GEMM reads) would all fall into one L1 set.
inline index_t v_stride(index_t C, index_t Tb) { return C * Tb + 16; }

// V[xi * v_stride + c * Tb + t] for channels [c0, c1) of one block.
template <int P>
void input_block(const float* x, const ConvGeometry& g, index_t C, index_t c0, index_t c1, const TileInfo& ti,
                 index_t Tb, float* V) {
  const index_t plane = g.H * g.W, vs = v_stride(C, Tb);
  index_t pf[6 * P];  // at most two lane groups x three tiles x P rows
  const int n_pf = c1 - c0 > kPrefetchChannels ? prefetch_offsets<P>(g, ti, Tb, pf) : 0;
  for (index_t c = c0; c < c1; ++c) {
    const float* xc = x + c * plane;
    if (c + kPrefetchChannels < c1)
      for (int i = 0; i < n_pf; ++i) __builtin_prefetch(xc + kPrefetchChannels * plane + pf[i]);
    for (index_t l0 = 0; l0 < Tb; l0 += VW) {
      wp_vf dv[P][P];
      load_tiles<P>(xc, g, ti, l0, dv);
      input_tiles<P>(dv, [&](int xi, wp_vf v) { store(V + xi * vs + c * Tb + l0, v); });
    }
  }
}

// ov = A^T M A (+ bias) of VW tiles at once.
template <int P>
inline void output_tiles(const wp_vf (&mv)[P][P], wp_vf bias_v, wp_vf (&ov)[P - 2][P - 2]) {
  constexpr int m = P - 2;
  wp_vf tmp[m][P];
#pragma GCC unroll 8
  for (int a = 0; a < m; ++a)
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) tmp[a][j] = combine(Mats<P>::AT[a], [&](int i) { return mv[i][j]; });
#pragma GCC unroll 8
  for (int a = 0; a < m; ++a)
#pragma GCC unroll 8
    for (int c = 0; c < m; ++c) ov[a][c] = combine(Mats<P>::AT[c], [&](int j) { return tmp[a][j]; }, &bias_v);
}

// Writes the m x m output tiles of lane group l0 / VW into channel plane yk, cropped to Ho x Wo.
template <int m>
inline void store_tiles(const wp_vf (&ov)[m][m], float* yk, const ConvGeometry& g, const TileInfo& ti, index_t l0) {
  if (ti.out_run[l0 / VW]) {
    store_run<m>(ov, yk + ti.ybase[l0], g.Wo);
    return;
  }
  alignas(64) float out[m][m][VW];
#pragma GCC unroll 8
  for (int a = 0; a < m; ++a)
#pragma GCC unroll 8
    for (int c = 0; c < m; ++c) store(out[a][c], ov[a][c]);
  const index_t lanes = std::min<index_t>(VW, ti.nt - l0);
  for (index_t l = 0; l < lanes; ++l) {
    const index_t t = l0 + l;
    float* dst = yk + ti.ybase[t];
    const index_t hm = std::min<index_t>(m, g.Ho - ti.oh0[t]), wm = std::min<index_t>(m, g.Wo - ti.ow0[t]);
    if (hm == m && wm == m) {
#pragma GCC unroll 8
      for (int a = 0; a < m; ++a)
#pragma GCC unroll 8
        for (int c = 0; c < m; ++c) dst[a * g.Wo + c] = out[a][c][l];
    } else {
      for (index_t a = 0; a < hm; ++a)
        for (index_t c = 0; c < wm; ++c) dst[a * g.Wo + c] = out[a][c][l];
    }
  }
}

// ov = the m x m outputs of lane group l0 of one output channel, whose M rows (one per position) are mrow: A^T M A,
// the bias, then the activation.
template <int P>
inline void output_lanes(const float* const (&mrow)[P * P], index_t l0, wp_vf bias_v, int act,
                         wp_vf (&ov)[P - 2][P - 2]) {
  constexpr int m = P - 2;
  wp_vf mv[P][P];
#pragma GCC unroll 8
  for (int i = 0; i < P; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) mv[i][j] = load(mrow[i * P + j] + l0);
  output_tiles<P>(mv, bias_v, ov);
  if (act != act_none) {
#pragma GCC unroll 8
    for (int a = 0; a < m; ++a)
#pragma GCC unroll 8
      for (int c = 0; c < m; ++c) ov[a][c] = activate(ov[a][c], act);
  }
}

// The M rows of output channel k, one per position.
template <int P, typename Row>
inline void channel_rows(Row row, index_t k, const float* (&mrow)[P * P]) {
  for (int xi = 0; xi < P * P; ++xi) mrow[xi] = row(xi, k);
}

// y for output channels [k0, k1) of one block; row(xi, k) points at the Tb floats of M holding position xi of output
// channel k (a zero row where the plan pruned it).
template <int P, typename Row>
void output_block(Row row, const ConvGeometry& g, index_t k0, index_t k1, const float* bias, int act,
                  const TileInfo& ti, float* y) {
  constexpr int m = P - 2;
  const index_t plane = g.Ho * g.Wo;
  for (index_t k = k0; k < k1; ++k) {
    const wp_vf bias_v = splat(bias ? bias[k] : 0.0f);
    float* yk = y + k * plane;
    const float* mrow[P * P];
    channel_rows<P>(row, k, mrow);
    for (index_t l0 = 0; l0 < ti.nt; l0 += VW) {
      wp_vf ov[m][m];
      output_lanes<P>(mrow, l0, bias_v, act, ov);
      store_tiles<m>(ov, yk, g, ti, l0);
    }
  }
}

// The dense M layout of the float32 kernels: (P2, K + 1, Tb).
struct DenseRows {
  const float* M;
  index_t K, Tb;
  const float* operator()(int xi, index_t k) const { return M + (xi * (K + 1) + k) * Tb; }
};

// One panel of R rows: M rows panel_rows[...] = A_q (n_cols x R)^T . V[cols], for NV vectors of tiles.
template <int NV, int R>
inline void panel_gemm_r(const WinogradPlanView& pl, index_t q, const float* Vx, float* Mx, index_t Tb) {
  const index_t cb = pl.panel_col_begin[q], ce = pl.panel_col_begin[q + 1];
  const float* a = pl.A + pl.panel_a_begin[q];
  const std::int32_t* cols = pl.panel_cols + cb;
  wp_vf acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = wp_vf{};
  for (index_t j = 0; j < ce - cb; ++j) {
    const float* bp = Vx + static_cast<index_t>(cols[j]) * Tb;
    wp_vf bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = load(bp + v * VW);
    const float* aj = a + j * R;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const wp_vf ar = splat(aj[r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
  const index_t* rows = pl.panel_rows + pl.panel_row_begin[q];
  const std::uint8_t* add = pl.panel_row_acc + pl.panel_row_begin[q];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* out = Mx + rows[r] * Tb;
    if (add[r]) {
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) store(out + v * VW, load(out + v * VW) + acc[r][v]);
    } else {
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) store(out + v * VW, acc[r][v]);
    }
  }
}

template <int NV>
inline void panel_gemm(const WinogradPlanView& pl, index_t q, const float* Vx, float* Mx, index_t Tb) {
  constexpr int third = MR / 3 > 0 ? MR / 3 : 1;
  const index_t h = pl.panel_row_begin[q + 1] - pl.panel_row_begin[q];
  if (h == MR) panel_gemm_r<NV, MR>(pl, q, Vx, Mx, Tb);
  else if (h == 2 * third) panel_gemm_r<NV, 2 * third>(pl, q, Vx, Mx, Tb);
  else panel_gemm_r<NV, third>(pl, q, Vx, Mx, Tb);
}

// One CSR row (WWP): four independent accumulator sets hide the FMA latency.
template <int NV>
inline void csr_row(const WinogradPlanView& pl, index_t row, const float* Vx, float* out, index_t Tb) {
  const index_t e0 = pl.row_ptr[row], e1 = pl.row_ptr[row + 1];
  wp_vf acc[4][NV];
  for (int s = 0; s < 4; ++s)
    for (int v = 0; v < NV; ++v) acc[s][v] = wp_vf{};
  index_t e = e0;
  for (; e + 4 <= e1; e += 4) {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const float* bp = Vx + static_cast<index_t>(pl.csr_cols[e + s]) * Tb;
      const wp_vf w = splat(pl.csr_vals[e + s]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[s][v] += w * load(bp + v * VW);
    }
  }
  for (; e < e1; ++e) {
    const float* bp = Vx + static_cast<index_t>(pl.csr_cols[e]) * Tb;
    const wp_vf w = splat(pl.csr_vals[e]);
    for (int v = 0; v < NV; ++v) acc[0][v] += w * load(bp + v * VW);
  }
  for (int v = 0; v < NV; ++v) store(out + v * VW, (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]));
}

struct Layout {
  index_t T, th, tw, Tb, blocks;
  int nv;
  bool shared;      // few blocks: threads cooperate on one block at a time
  index_t v_size, m_size, slots;
};

// Output tiles per column / row and in all, and the vectors of tiles a block row takes (one for a few tiles).
struct TileCounts {
  index_t th, tw, T;
  int nv;
};

inline TileCounts tile_counts(int m, const ConvGeometry& g) {
  const index_t th = (g.Ho + m - 1) / m, tw = (g.Wo + m - 1) / m, T = g.N * th * tw;
  return {th, tw, T, T <= VW ? 1 : 2};
}

inline Layout layout(const WinogradPlanView& pl, const ConvGeometry& g, int threads) {
  Layout L{};
  const TileCounts tc = tile_counts(pl.m, g);
  L.th = tc.th;
  L.tw = tc.tw;
  L.T = tc.T;
  L.nv = tc.nv;
  L.Tb = L.nv * VW;
  L.blocks = (L.T + L.Tb - 1) / L.Tb;
  L.shared = threads > 1 && L.blocks < 4 * static_cast<index_t>(threads);
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p;
  L.v_size = P2 * v_stride(pl.C, L.Tb);
  L.m_size = P2 * (pl.K + 1) * L.Tb;
  L.slots = L.shared ? 1 : std::max(threads, 1);
  return L;
}

inline index_t workspace_size(const WinogradPlanView& pl, const ConvGeometry& g, int threads) {
  const Layout L = layout(pl, g, threads);
  return L.slots * (L.v_size + L.m_size);
}

inline void zero_pruned_rows(const WinogradPlanView& pl, float* M, index_t Tb) {
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p;
  if (pl.csr) return;  // CSR writes every row
  for (index_t xi = 0; xi < P2; ++xi)
    for (index_t z = pl.zero_begin[xi]; z < pl.zero_begin[xi + 1]; ++z)
      std::memset(M + (xi * (pl.K + 1) + pl.zero_rows[z]) * Tb, 0, sizeof(float) * Tb);
}

// GEMM work item w of a block: a panel (structured) or a (position, row) pair (CSR).
template <int NV>
inline void gemm_item(const WinogradPlanView& pl, index_t w, const index_t* panel_xi, const float* V, float* M,
                      index_t Tb) {
  if (pl.csr) {
    const index_t xi = w / pl.K, k = w % pl.K;
    csr_row<NV>(pl, w, V + xi * v_stride(pl.C, Tb), M + (xi * (pl.K + 1) + k) * Tb, Tb);
  } else {
    for (index_t q = pl.item_begin[w]; q < pl.item_begin[w + 1]; ++q) {
      const index_t xi = panel_xi[q];
      panel_gemm<NV>(pl, q, V + xi * v_stride(pl.C, Tb), M + xi * (pl.K + 1) * Tb, Tb);
    }
  }
}

// Seconds since the previous lap when stage timing is on (the clock is read only then; 0 otherwise).
struct StageClock {
  using clock = std::chrono::steady_clock;
  bool on;
  clock::time_point last;
  explicit StageClock(bool enabled) : on(enabled), last(enabled ? clock::now() : clock::time_point{}) {}
  double lap() {
    if (!on) return 0.0;
    const auto now = clock::now();
    const double s = std::chrono::duration<double>(now - last).count();
    last = now;
    return s;
  }
};

inline void add_stages(StageSeconds* st, double in, double gemm, double out) {
  if (!st) return;
#pragma omp critical(winoprune_stage_seconds)
  {
    st->input += in;
    st->gemm += gemm;
    st->output += out;
  }
}

template <int P, int NV>
void forward_impl(const WinogradPlanView& pl, const ConvGeometry& g, const Layout& L, const float* x, float* y,
                  float* ws, const index_t* panel_xi, index_t n_items, int threads, StageSeconds* st) {
  const index_t C = pl.C, K = pl.K, Tb = L.Tb;
  if (!L.shared) {
#pragma omp parallel num_threads(threads)
    {
#if defined(_OPENMP)
      const index_t tid = omp_get_thread_num();
#else
      const index_t tid = 0;
#endif
      float* V = ws + tid * (L.v_size + L.m_size);
      float* M = V + L.v_size;
      zero_pruned_rows(pl, M, Tb);
      TileInfo ti;
      StageClock clk(st != nullptr);
      double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
#pragma omp for schedule(static)
      for (index_t b = 0; b < L.blocks; ++b) {
        clk.lap();
        tile_info<P>(g, C, K, L.th, L.tw, b * Tb, Tb, L.T, ti);
        input_block<P>(x, g, C, 0, C, ti, Tb, V);
        t_in += clk.lap();
        for (index_t w = 0; w < n_items; ++w) gemm_item<NV>(pl, w, panel_xi, V, M, Tb);
        t_gemm += clk.lap();
        output_block<P>(DenseRows{M, K, Tb}, g, 0, K, pl.bias, pl.act, ti, y);
        t_out += clk.lap();
      }
      add_stages(st, t_in, t_gemm, t_out);
    }
    return;
  }
  float* V = ws;
  float* M = V + L.v_size;
  zero_pruned_rows(pl, M, Tb);
#pragma omp parallel num_threads(threads)
  {
    TileInfo ti;
    StageClock clk(st != nullptr);
    double t_in = 0.0, t_gemm = 0.0, t_out = 0.0;
    for (index_t b = 0; b < L.blocks; ++b) {
      clk.lap();
      tile_info<P>(g, C, K, L.th, L.tw, b * Tb, Tb, L.T, ti);
#pragma omp for schedule(static)
      for (index_t c = 0; c < C; ++c) input_block<P>(x, g, C, c, c + 1, ti, Tb, V);
      t_in += clk.lap();
#pragma omp for schedule(dynamic, 4)
      for (index_t w = 0; w < n_items; ++w) gemm_item<NV>(pl, w, panel_xi, V, M, Tb);
      t_gemm += clk.lap();
#pragma omp for schedule(static)
      for (index_t k = 0; k < K; ++k) output_block<P>(DenseRows{M, K, Tb}, g, k, k + 1, pl.bias, pl.act, ti, y);
      t_out += clk.lap();
    }
    add_stages(st, t_in, t_gemm, t_out);
  }
}

}  // namespace winograd_detail

inline index_t winograd_workspace(const WinogradPlanView& pl, const ConvGeometry& g, int threads) {
  return winograd_detail::workspace_size(pl, g, threads);
}

// Throws std::invalid_argument on a plan packed for another panel height or a too-small workspace.
inline void winograd_forward(const WinogradPlanView& pl, const ConvGeometry& g, const float* x, float* y,
                             float* workspace, index_t workspace_size, int threads, StageSeconds* stages) {
  using namespace winograd_detail;
  if (!pl.csr && pl.mr != MR) throw std::invalid_argument("plan was packed for another ISA (panel height differs)");
  threads = std::max(threads, 1);
  const Layout L = layout(pl, g, threads);
  if (workspace_size < L.slots * (L.v_size + L.m_size)) throw std::invalid_argument("workspace too small");
  const index_t P2 = static_cast<index_t>(pl.p) * pl.p;
  const index_t n_items = pl.csr ? P2 * pl.K : pl.n_items;
#define WINOPRUNE_FWD(P, NV) forward_impl<P, NV>(pl, g, L, x, y, workspace, pl.panel_xi, n_items, threads, stages)
  if (pl.p == 4) {
    if (L.nv == 1) WINOPRUNE_FWD(4, 1); else WINOPRUNE_FWD(4, 2);
  } else if (pl.p == 6) {
    if (L.nv == 1) WINOPRUNE_FWD(6, 1); else WINOPRUNE_FWD(6, 2);
  } else {
    throw std::invalid_argument("only F(2,3) and F(4,3) have native kernels (p = 4 or 6)");
  }
#undef WINOPRUNE_FWD
}
