// Vector Winograd tile transforms for training F(2,3) / F(4,3): the maps of winograd_tiles.h (same layouts, same
// results up to float rounding order), VW tiles at a time.
//
// Included only by kernels_isa.cpp, inside one ISA namespace per compilation (see isa.h); it reuses the inference
// kernels' tile machinery (winograd_conv_kernels.h): lane groups of VW consecutive tiles t = (n, ty, tx), each read
// by contiguous loads + shuffles when the VW tiles sit side by side inside the image, else by hardware gathers
// (AVX2 / AVX-512), else by scalar reads; the transform matrices are compile-time constants, so zero coefficients
// cost nothing and +-1 need no multiply.
//
// Work split (no two threads ever write the same element, no locks):
//   input, output, output adjoint: items = (lane group, chunk of channels); each item writes its own V / M / dM
//                                  entries or its own output tiles (output tiles never overlap);
//   input adjoint                : per channel c (its N planes of dx); overlapping tiles are accumulated in order.
#pragma once

#include <algorithm>
#include <cstdint>

namespace training_detail {

using namespace winograd_detail;

// Transposed transform matrices: column i of AT / BT as a row, so `combine` can run over them.
template <int P>
struct Transposed {
  float AT[P][P - 2]{};  // AT[i][a] = Mats<P>::AT[a][i]
  float BT[P][P]{};      // BT[u][i] = Mats<P>::BT[i][u]
  constexpr Transposed() {
    for (int i = 0; i < P; ++i) {
      for (int a = 0; a < P - 2; ++a) AT[i][a] = Mats<P>::AT[a][i];
      for (int u = 0; u < P; ++u) BT[u][i] = Mats<P>::BT[i][u];
    }
  }
};
template <int P>
inline constexpr Transposed<P> transposed{};

constexpr index_t channel_chunk = 16;  // channels per work item

template <int P>
inline ConvGeometry conv_geometry(const TileGeometry& g, bool output_side) {
  if (output_side) return ConvGeometry{g.N, g.H, g.W, 0, 0, g.H, g.W};
  return ConvGeometry{g.N, g.H, g.W, g.pad_top, g.pad_left, g.th * (P - 2), g.tw * (P - 2)};
}

// Vector of the nt <= VW floats at src (zero beyond nt).
inline wp_vf load_part(const float* src, index_t nt) {
  if (nt == VW) return load(src);
  alignas(64) float buf[VW] = {};
  for (index_t l = 0; l < nt; ++l) buf[l] = src[l];
  return load(buf);
}

// Stores the first nt <= VW lanes of v at dst (never beyond: the next floats belong to another item).
inline void store_part(float* dst, wp_vf v, index_t nt) {
  if (nt == VW) {
    store(dst, v);
    return;
  }
  alignas(64) float buf[VW];
  store(buf, v);
  for (index_t l = 0; l < nt; ++l) dst[l] = buf[l];
}

// Runs body(cg, ti, t0, c0, c1) for every work item (a lane group of VW tiles from t0 x the channels [c0, c1)), in
// parallel; ti describes the group's tiles (see tile_info), cg the geometry the tile machinery reads.
template <int P, typename Body>
inline void for_each_item(const TileGeometry& g, bool output_side, int threads, Body body) {
  const index_t T = g.N * g.th * g.tw, groups = (T + VW - 1) / VW, chunks = (g.C + channel_chunk - 1) / channel_chunk;
  const ConvGeometry cg = conv_geometry<P>(g, output_side);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (index_t item = 0; item < groups * chunks; ++item) {
    const index_t grp = item / chunks, c0 = (item % chunks) * channel_chunk;
    TileInfo ti;
    tile_info<P>(cg, g.C, g.C, g.th, g.tw, grp * VW, VW, T, ti);
    body(cg, ti, grp * VW, c0, std::min(g.C, c0 + channel_chunk));
  }
}

template <int P>
void input(const float* x, const TileGeometry& g, float* V, int threads) {
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W, CT = g.C * T;
  for_each_item<P>(g, false, threads, [&](const ConvGeometry& cg, const TileInfo& ti, index_t t0, index_t c0,
                                          index_t c1) {
    for (index_t c = c0; c < c1; ++c) {
      wp_vf dv[P][P];
      load_tiles<P>(x + c * plane, cg, ti, 0, dv);
      float* vc = V + c * T + t0;
      input_tiles<P>(dv, [&](int xi, wp_vf v) { store_part(vc + xi * CT, v, ti.nt); });
    }
  });
}

template <int P>
void output(const float* M, const TileGeometry& g, const float* bias, const std::int64_t* rows, float* y,
            int threads) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W;
  for_each_item<P>(g, true, threads, [&](const ConvGeometry& cg, const TileInfo& ti, index_t t0, index_t k0,
                                         index_t k1) {
    for (index_t k = k0; k < k1; ++k) {
      wp_vf mv[P][P], ov[m][m];
#pragma GCC unroll 8
      for (int xi = 0; xi < P * P; ++xi) {
        const index_t r = tile_row(rows, xi, g.C, k);
        mv[xi / P][xi % P] = r < 0 ? wp_vf{} : load_part(M + r * T + t0, ti.nt);
      }
      output_tiles<P>(mv, splat(bias ? bias[k] : 0.0f), ov);
      store_tiles<m>(ov, y + k * plane, cg, ti, 0);
    }
  });
}

// d[a][b] of the VW output tiles of a lane group (zero outside Ho x Wo and beyond ti.nt): the inverse of store_tiles.
template <int m>
inline void load_out_tiles(const float* yk, const ConvGeometry& g, const TileInfo& ti, wp_vf (&d)[m][m]) {
  if (ti.out_run[0]) {
    const Masks& mk = masks();
    for (int a = 0; a < m; ++a) {
      const float* r = yk + ti.ybase[0] + a * g.Wo;
      if constexpr (m == 2) {
        const wp_vf lo = load(r), hi = load(r + VW);
        d[a][0] = __builtin_shuffle(lo, hi, mk.even);
        d[a][1] = __builtin_shuffle(lo, hi, mk.odd);
      } else {
        const wp_vf q0 = load(r), q1 = load(r + VW), q2 = load(r + 2 * VW), q3 = load(r + 3 * VW);
        const wp_vf e01 = __builtin_shuffle(q0, q1, mk.even), e23 = __builtin_shuffle(q2, q3, mk.even);
        const wp_vf o01 = __builtin_shuffle(q0, q1, mk.odd), o23 = __builtin_shuffle(q2, q3, mk.odd);
        d[a][0] = __builtin_shuffle(e01, e23, mk.even);
        d[a][1] = __builtin_shuffle(o01, o23, mk.even);
        d[a][2] = __builtin_shuffle(e01, e23, mk.odd);
        d[a][3] = __builtin_shuffle(o01, o23, mk.odd);
      }
    }
    return;
  }
  alignas(64) float buf[m][m][VW] = {};
  for (index_t l = 0; l < ti.nt; ++l) {
    const float* src = yk + ti.ybase[l];
    const index_t hm = std::min<index_t>(m, g.Ho - ti.oh0[l]), wm = std::min<index_t>(m, g.Wo - ti.ow0[l]);
    for (index_t a = 0; a < hm; ++a)
      for (index_t b = 0; b < wm; ++b) buf[a][b][l] = src[a * g.Wo + b];
  }
  for (int a = 0; a < m; ++a)
    for (int b = 0; b < m; ++b) d[a][b] = load(buf[a][b]);
}

template <int P>
void output_adjoint(const float* dy, const TileGeometry& g, const std::int64_t* rows, float* dM, int threads) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W;
  constexpr const Transposed<P>& tr = transposed<P>;
  for_each_item<P>(g, true, threads, [&](const ConvGeometry& cg, const TileInfo& ti, index_t t0, index_t k0,
                                         index_t k1) {
    for (index_t k = k0; k < k1; ++k) {
      wp_vf d[m][m], tmp[P][m];
      load_out_tiles<m>(dy + k * plane, cg, ti, d);
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i)  // A d
#pragma GCC unroll 8
        for (int b = 0; b < m; ++b) tmp[i][b] = combine(tr.AT[i], [&](int a) { return d[a][b]; });
#pragma GCC unroll 8
      for (int i = 0; i < P; ++i)  // (A d) A^T
#pragma GCC unroll 8
        for (int j = 0; j < P; ++j) {
          const index_t r = tile_row(rows, i * P + j, g.C, k);
          if (r >= 0) store_part(dM + r * T + t0, combine(tr.AT[j], [&](int b) { return tmp[i][b]; }), ti.nt);
        }
    }
  });
}

// Adds s[u][v] of VW side-by-side tiles (lane l at columns m * l + v of row u) into dst rows; the tiles overlap by
// P - m = 2 columns, so lane l's columns m..m+1 land on lane l + 1's columns 0..1 (one lane shift).
template <int P>
inline void add_run(const wp_vf (&s)[P][P], float* dst, index_t W) {
  constexpr int m = P - 2;
  const Masks& mk = masks();
  wp_vi shift;  // lane l <- lane l - 1 of the second operand, lane 0 <- 0
  for (int l = 0; l < VW; ++l) shift[l] = l == 0 ? 0 : VW + l - 1;
  const wp_vf zero{};
  for (int u = 0; u < P; ++u) {
    float* r = dst + u * W;
    wp_vf o[m];
    for (int q = 0; q < m; ++q) o[q] = s[u][q];
    o[0] += __builtin_shuffle(zero, s[u][m], shift);
    o[1] += __builtin_shuffle(zero, s[u][m + 1], shift);
    if constexpr (m == 2) {
      store(r, load(r) + __builtin_shuffle(o[0], o[1], mk.ilo));
      store(r + VW, load(r + VW) + __builtin_shuffle(o[0], o[1], mk.ihi));
    } else {
      const wp_vf plo = __builtin_shuffle(o[0], o[2], mk.ilo), phi = __builtin_shuffle(o[0], o[2], mk.ihi);
      const wp_vf qlo = __builtin_shuffle(o[1], o[3], mk.ilo), qhi = __builtin_shuffle(o[1], o[3], mk.ihi);
      store(r, load(r) + __builtin_shuffle(plo, qlo, mk.ilo));
      store(r + VW, load(r + VW) + __builtin_shuffle(plo, qlo, mk.ihi));
      store(r + 2 * VW, load(r + 2 * VW) + __builtin_shuffle(phi, qhi, mk.ilo));
      store(r + 3 * VW, load(r + 3 * VW) + __builtin_shuffle(phi, qhi, mk.ihi));
    }
    r[m * VW] += s[u][m][VW - 1];
    r[m * VW + 1] += s[u][m + 1][VW - 1];
  }
}

template <int P>
void input_adjoint(const float* dV, const TileGeometry& g, float* dx, int threads) {
  const index_t T = g.N * g.th * g.tw, groups = (T + VW - 1) / VW;
  const ConvGeometry cg = conv_geometry<P>(g, false);
  const index_t plane = g.H * g.W, CT = g.C * T;
  constexpr const Transposed<P>& tr = transposed<P>;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (index_t c = 0; c < g.C; ++c) {
    float* xc = dx + c * plane;
    for (index_t n = 0; n < g.N; ++n) std::fill(xc + n * g.C * plane, xc + n * g.C * plane + plane, 0.0f);
    TileInfo ti;
    for (index_t grp = 0; grp < groups; ++grp) {
      tile_info<P>(cg, g.C, g.C, g.th, g.tw, grp * VW, VW, T, ti);
      const float* vc = dV + c * T + grp * VW;
      wp_vf dv[P][P], tmp[P][P], s[P][P];
#pragma GCC unroll 8
      for (int xi = 0; xi < P * P; ++xi) dv[xi / P][xi % P] = load_part(vc + xi * CT, ti.nt);
#pragma GCC unroll 8
      for (int u = 0; u < P; ++u)  // B dV
#pragma GCC unroll 8
        for (int j = 0; j < P; ++j) tmp[u][j] = combine(tr.BT[u], [&](int i) { return dv[i][j]; });
#pragma GCC unroll 8
      for (int u = 0; u < P; ++u)  // (B dV) B^T
#pragma GCC unroll 8
        for (int v = 0; v < P; ++v) s[u][v] = combine(tr.BT[v], [&](int j) { return tmp[u][j]; });
      if (ti.in_run[0]) {
        add_run<P>(s, xc + ti.xbase[0] + ti.h0[0] * g.W + ti.w0[0], g.W);
        continue;
      }
      alignas(64) float buf[P][P][VW];
      for (int u = 0; u < P; ++u)
        for (int v = 0; v < P; ++v) store(buf[u][v], s[u][v]);
      for (index_t l = 0; l < ti.nt; ++l) {
        float* xt = xc + ti.xbase[l];
        for (int u = 0; u < P; ++u) {
          const index_t h = ti.h0[l] + u;
          if (h < 0 || h >= g.H) continue;
          for (int v = 0; v < P; ++v) {
            const index_t w = ti.w0[l] + v;
            if (w >= 0 && w < g.W) xt[h * g.W + w] += buf[u][v][l];
          }
        }
      }
    }
  }
}

}  // namespace training_detail

inline const float* train_BT(int p) {
  if (p == 4) return &winograd_detail::Mats<4>::BT[0][0];
  if (p == 6) return &winograd_detail::Mats<6>::BT[0][0];
  return nullptr;
}

inline const float* train_AT(int p) {
  if (p == 4) return &winograd_detail::Mats<4>::AT[0][0];
  if (p == 6) return &winograd_detail::Mats<6>::AT[0][0];
  return nullptr;
}

#define WINOPRUNE_TRAIN_DISPATCH(FN, ARGS)                   \
  threads = std::max(threads, 1);                            \
  if (p != 4 && p != 6) return false;                        \
  if (g.N * g.C == 0) return true;                           \
  if (p == 4) training_detail::FN<4> ARGS;                   \
  else training_detail::FN<6> ARGS;                          \
  return true;

inline bool train_input(const float* x, const TileGeometry& g, int p, float* V, int threads) {
  WINOPRUNE_TRAIN_DISPATCH(input, (x, g, V, threads))
}
inline bool train_input_adjoint(const float* dV, const TileGeometry& g, int p, float* dx, int threads) {
  WINOPRUNE_TRAIN_DISPATCH(input_adjoint, (dV, g, dx, threads))
}
inline bool train_output(const float* M, const TileGeometry& g, const float* bias, const std::int64_t* rows, int p,
                         float* y, int threads) {
  WINOPRUNE_TRAIN_DISPATCH(output, (M, g, bias, rows, y, threads))
}
inline bool train_output_adjoint(const float* dy, const TileGeometry& g, const std::int64_t* rows, int p, float* dM,
                                 int threads) {
  WINOPRUNE_TRAIN_DISPATCH(output_adjoint, (dy, g, rows, dM, threads))
}
#undef WINOPRUNE_TRAIN_DISPATCH
