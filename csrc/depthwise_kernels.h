// Pruned depthwise convolution: a direct per-channel kernel that visits only the kept taps of each channel.
//
// Included only by kernels_isa.cpp inside one ISA namespace (see isa.h). On a CPU this beats a DR-GEMM emulation:
// the work is proportional to the kept taps and every output row is accumulated in L1 from contiguous input rows,
// which the compiler vectorises with the ISA's vector width. Parallel over (image, channel) planes.
#pragma once

#include <algorithm>

#include "isa.h"

namespace depthwise_detail {

inline index_t ceil_div(index_t a, index_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
inline index_t floor_div(index_t a, index_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline void plane(const DepthwisePlanView& pl, const DepthwiseGeometry& g, index_t c, const float* __restrict xp,
                  float* __restrict yp) {
  const float b = pl.bias ? pl.bias[c] : 0.0f;
  const index_t t0 = pl.tap_begin[c], t1 = pl.tap_begin[c + 1];
  const index_t sh = pl.stride_h, sw = pl.stride_w;
  for (index_t oh = 0; oh < g.Ho; ++oh) {
    float* __restrict yr = yp + oh * g.Wo;
    for (index_t ow = 0; ow < g.Wo; ++ow) yr[ow] = b;
    for (index_t t = t0; t < t1; ++t) {
      const index_t ih = oh * sh + pl.tap_dy[t] - g.pad_top;
      if (ih < 0 || ih >= g.H) continue;
      const index_t off = pl.tap_dx[t] - g.pad_left;  // iw = ow * sw + off
      const index_t lo = std::max<index_t>(0, ceil_div(-off, sw));
      const index_t hi = std::min<index_t>(g.Wo, floor_div(g.W - 1 - off, sw) + 1);
      const float w = pl.tap_w[t];
      const float* __restrict xr = xp + ih * g.W + off;
      if (sw == 1) {
        for (index_t ow = lo; ow < hi; ++ow) yr[ow] += w * xr[ow];
      } else if (sw == 2) {
        for (index_t ow = lo; ow < hi; ++ow) yr[ow] += w * xr[2 * ow];
      } else {
        for (index_t ow = lo; ow < hi; ++ow) yr[ow] += w * xr[ow * sw];
      }
    }
  }
}

}  // namespace depthwise_detail

inline void depthwise_forward(const DepthwisePlanView& pl, const DepthwiseGeometry& g, const float* x, float* y,
                              int threads) {
  const index_t planes = g.N * pl.C, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
#pragma omp parallel for schedule(static) num_threads(std::max(threads, 1))
  for (index_t nc = 0; nc < planes; ++nc)
    depthwise_detail::plane(pl, g, nc % pl.C, x + nc * in_plane, y + nc * out_plane);
}
