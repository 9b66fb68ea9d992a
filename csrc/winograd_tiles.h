// Winograd tile transforms F(m x m, 3 x 3) and their adjoints, on contiguous float32 buffers (torch-free).
//
// Layouts (p = m + 2, P2 = p * p, T = N * th * tw tiles, tile t = (n * th + ty) * tw + tx):
//   x  : (N, C, H, W)    NCHW input; the tile (ty, tx) covers rows ty*m - pad_top ... + p - 1 (zero outside)
//   V  : (P2, C, T)      transformed input tiles, V[xi] = B^T d B, one C x T matrix per Winograd position xi
//   M  : (P2, K, T)      per-position GEMM results M[xi] = U[xi] @ V[xi]
//   y  : (N, K, Ho, Wo)  output; tile (ty, tx) writes rows ty*m ... ty*m + m - 1 that fall inside Ho x Wo
// The adjoints are the exact transposes of the forward maps (they are what autograd needs):
//   input_transform_adjoint : dV -> dx   (scatter-add of B dV B^T over overlapping tiles)
//   output_transform_adjoint: dy -> dM   (A^T-transpose of the cropped output tile)
// Every routine is parallel over (image, channel) planes, so writes never conflict.
#pragma once

#include "isa.h"  // TileGeometry

namespace winoprune {


template <int P>
void input_transform_p(const float* x, const TileGeometry& g, const float* BT, float* V) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W, n_planes = g.N * g.C;
  WINOPRUNE_PARALLEL_FOR
  for (index_t nc = 0; nc < n_planes; ++nc) {
    const index_t n = nc / g.C, c = nc % g.C;
    const float* xp = x + nc * plane;
    float* vbase = V + c * T + n * g.th * g.tw;
    for (index_t ty = 0; ty < g.th; ++ty) {
      const index_t h0 = ty * m - g.pad_top;
      for (index_t tx = 0; tx < g.tw; ++tx) {
        const index_t w0 = tx * m - g.pad_left;
        float d[P][P];
        for (int u = 0; u < P; ++u) {
          const index_t h = h0 + u;
          const bool row_ok = h >= 0 && h < g.H;
          for (int v = 0; v < P; ++v) {
            const index_t w = w0 + v;
            d[u][v] = (row_ok && w >= 0 && w < g.W) ? xp[h * g.W + w] : 0.0f;
          }
        }
        float tmp[P][P];  // B^T d
        for (int i = 0; i < P; ++i)
          for (int v = 0; v < P; ++v) {
            float s = 0.0f;
            for (int u = 0; u < P; ++u) s += BT[i * P + u] * d[u][v];
            tmp[i][v] = s;
          }
        const index_t t = ty * g.tw + tx;
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j) {
            float s = 0.0f;
            for (int v = 0; v < P; ++v) s += tmp[i][v] * BT[j * P + v];
            vbase[(i * P + j) * g.C * T + t] = s;
          }
      }
    }
  }
}

template <int P>
void input_transform_adjoint_p(const float* dV, const TileGeometry& g, const float* BT, float* dx) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W, n_planes = g.N * g.C;
  WINOPRUNE_PARALLEL_FOR
  for (index_t nc = 0; nc < n_planes; ++nc) {
    const index_t n = nc / g.C, c = nc % g.C;
    float* xp = dx + nc * plane;
    for (index_t k = 0; k < plane; ++k) xp[k] = 0.0f;
    const float* vbase = dV + c * T + n * g.th * g.tw;
    for (index_t ty = 0; ty < g.th; ++ty) {
      const index_t h0 = ty * m - g.pad_top;
      for (index_t tx = 0; tx < g.tw; ++tx) {
        const index_t w0 = tx * m - g.pad_left, t = ty * g.tw + tx;
        float dv[P][P];
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j) dv[i][j] = vbase[(i * P + j) * g.C * T + t];
        float tmp[P][P];  // B dv   (B = BT^T)
        for (int u = 0; u < P; ++u)
          for (int j = 0; j < P; ++j) {
            float s = 0.0f;
            for (int i = 0; i < P; ++i) s += BT[i * P + u] * dv[i][j];
            tmp[u][j] = s;
          }
        for (int u = 0; u < P; ++u) {
          const index_t h = h0 + u;
          if (h < 0 || h >= g.H) continue;
          for (int v = 0; v < P; ++v) {
            const index_t w = w0 + v;
            if (w < 0 || w >= g.W) continue;
            float s = 0.0f;
            for (int j = 0; j < P; ++j) s += tmp[u][j] * BT[j * P + v];
            xp[h * g.W + w] += s;
          }
        }
      }
    }
  }
}

// y = A^T M A per tile (+ bias[k] when bias != nullptr). Here g.C is K and g.H, g.W are Ho, Wo.
template <int P>
void output_transform_p(const float* M, const TileGeometry& g, const float* AT, const float* bias,
                        const std::int64_t* rows, float* y) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W, n_planes = g.N * g.C;
  WINOPRUNE_PARALLEL_FOR
  for (index_t nk = 0; nk < n_planes; ++nk) {
    const index_t n = nk / g.C, k = nk % g.C;
    float* yp = y + nk * plane;
    const float b = bias ? bias[k] : 0.0f;
    const index_t t_n = n * g.th * g.tw;
    for (index_t ty = 0; ty < g.th; ++ty)
      for (index_t tx = 0; tx < g.tw; ++tx) {
        const index_t t = t_n + ty * g.tw + tx;
        float tmp[m][P];  // A^T M
        float mm[P][P];
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j) {
            const index_t r = tile_row(rows, i * P + j, g.C, k);
            mm[i][j] = r < 0 ? 0.0f : M[r * T + t];
          }
        for (int a = 0; a < m; ++a)
          for (int j = 0; j < P; ++j) {
            float s = 0.0f;
            for (int i = 0; i < P; ++i) s += AT[a * P + i] * mm[i][j];
            tmp[a][j] = s;
          }
        for (int a = 0; a < m; ++a) {
          const index_t h = ty * m + a;
          if (h >= g.H) break;
          for (int bb = 0; bb < m; ++bb) {
            const index_t w = tx * m + bb;
            if (w >= g.W) break;
            float s = b;
            for (int j = 0; j < P; ++j) s += tmp[a][j] * AT[bb * P + j];
            yp[h * g.W + w] = s;
          }
        }
      }
  }
}

template <int P>
void output_transform_adjoint_p(const float* dy, const TileGeometry& g, const float* AT, const std::int64_t* rows,
                                float* dM) {
  constexpr int m = P - 2;
  const index_t T = g.N * g.th * g.tw, plane = g.H * g.W, n_planes = g.N * g.C;
  WINOPRUNE_PARALLEL_FOR
  for (index_t nk = 0; nk < n_planes; ++nk) {
    const index_t n = nk / g.C, k = nk % g.C;
    const float* yp = dy + nk * plane;
    const index_t t_n = n * g.th * g.tw;
    for (index_t ty = 0; ty < g.th; ++ty)
      for (index_t tx = 0; tx < g.tw; ++tx) {
        float d[m][m];
        for (int a = 0; a < m; ++a)
          for (int bb = 0; bb < m; ++bb) {
            const index_t h = ty * m + a, w = tx * m + bb;
            d[a][bb] = (h < g.H && w < g.W) ? yp[h * g.W + w] : 0.0f;
          }
        float tmp[P][m];  // A d
        for (int i = 0; i < P; ++i)
          for (int bb = 0; bb < m; ++bb) {
            float s = 0.0f;
            for (int a = 0; a < m; ++a) s += AT[a * P + i] * d[a][bb];
            tmp[i][bb] = s;
          }
        const index_t t = t_n + ty * g.tw + tx;
        for (int i = 0; i < P; ++i)
          for (int j = 0; j < P; ++j) {
            const index_t r = tile_row(rows, i * P + j, g.C, k);
            if (r < 0) continue;
            float s = 0.0f;
            for (int bb = 0; bb < m; ++bb) s += tmp[i][bb] * AT[bb * P + j];
            dM[r * T + t] = s;
          }
      }
  }
}

// Dispatch on the tile size; each returns false when p is not 4, 6 or 8.
#define WINOPRUNE_DISPATCH_P(p, CALL) \
  switch (p) {                        \
    case 4: CALL(4); return true;     \
    case 6: CALL(6); return true;     \
    case 8: CALL(8); return true;     \
    default: return false;            \
  }

inline bool input_transform(const float* x, const TileGeometry& g, const float* BT, int p, float* V) {
#define WINOPRUNE_CALL(P) input_transform_p<P>(x, g, BT, V)
  WINOPRUNE_DISPATCH_P(p, WINOPRUNE_CALL)
#undef WINOPRUNE_CALL
}
inline bool input_transform_adjoint(const float* dV, const TileGeometry& g, const float* BT, int p, float* dx) {
#define WINOPRUNE_CALL(P) input_transform_adjoint_p<P>(dV, g, BT, dx)
  WINOPRUNE_DISPATCH_P(p, WINOPRUNE_CALL)
#undef WINOPRUNE_CALL
}
inline bool output_transform(const float* M, const TileGeometry& g, const float* AT, const float* bias,
                             const std::int64_t* rows, int p, float* y) {
#define WINOPRUNE_CALL(P) output_transform_p<P>(M, g, AT, bias, rows, y)
  WINOPRUNE_DISPATCH_P(p, WINOPRUNE_CALL)
#undef WINOPRUNE_CALL
}
inline bool output_transform_adjoint(const float* dy, const TileGeometry& g, const float* AT,
                                     const std::int64_t* rows, int p, float* dM) {
#define WINOPRUNE_CALL(P) output_transform_adjoint_p<P>(dy, g, AT, rows, dM)
  WINOPRUNE_DISPATCH_P(p, WINOPRUNE_CALL)
#undef WINOPRUNE_CALL
}
#undef WINOPRUNE_DISPATCH_P

}  // namespace winoprune
