// Winograd filter transform U = G g G^T for F(m x m, 3 x 3), on contiguous float32 buffers.
//
// g: (n_filters, 3, 3) spatial kernels (n_filters = K * C), U: (n_filters, p, p) Winograd-domain kernels.
// G: (p, 3) transform matrix in float64 (generated once on the Python side from exact rationals).
// Accumulates in double, so the result is the correctly rounded float32 of the exact transform for
// integer/power-of-two interpolation points.
#pragma once

#include "common.h"

namespace winoprune {

template <int P>
void filter_transform_p(const float* g, index_t n_filters, const double* G, float* U) {
  WINOPRUNE_PARALLEL_FOR
  for (index_t f = 0; f < n_filters; ++f) {
    const float* gf = g + f * 9;
    float* uf = U + f * P * P;
    double tmp[P][3];  // G g
    for (int i = 0; i < P; ++i)
      for (int c = 0; c < 3; ++c) {
        double s = 0.0;
        for (int r = 0; r < 3; ++r) s += G[i * 3 + r] * static_cast<double>(gf[r * 3 + c]);
        tmp[i][c] = s;
      }
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j) {
        double s = 0.0;
        for (int c = 0; c < 3; ++c) s += tmp[i][c] * G[j * 3 + c];
        uf[i * P + j] = static_cast<float>(s);
      }
  }
}

// Returns false when p is not a supported tile size (4, 6 or 8).
inline bool filter_transform(const float* g, index_t n_filters, const double* G, int p, float* U) {
  switch (p) {
    case 4: filter_transform_p<4>(g, n_filters, G, U); return true;
    case 6: filter_transform_p<6>(g, n_filters, G, U); return true;
    case 8: filter_transform_p<8>(g, n_filters, G, U); return true;
    default: return false;
  }
}

}  // namespace winoprune
