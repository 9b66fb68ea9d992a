// Max pooling of NCHW planes (torch-free, raw pointers).
//
// Included only by kernels_isa.cpp inside one ISA namespace (see isa.h). PyTorch's NCHW max pooling is slow at small
// batches (3.2 ms for ResNet's 3x3 stride-2 pool of 64 x 112 x 112 on 2 cores, 0.16 ms channels-last), so deployed
// models run this one: per plane, a zero-copy pass over the rows that each output row reads, separable (the
// horizontal maxima of a row are computed once and reused by every output row that reads it). Positions outside the
// input are -inf (they never win), as in PyTorch. Parallel over planes; per-thread scratch reused across calls.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "isa.h"

namespace pool_detail {

inline std::vector<float>& scratch() {
  static thread_local std::vector<float> s;
  return s;
}

// max(a, b) that propagates NaN (as PyTorch's pooling does); written as a select so that loops vectorise.
inline float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// 2x2 stride 2 without padding (VGG's pools): every window lies inside the plane, so each output is the maximum of
// two adjacent pairs of two rows; no padded copy, no scratch.
inline bool plane_2x2(const PoolGeometry& g, const float* __restrict xp, float* __restrict yp) {
  if (g.kh != 2 || g.kw != 2 || g.stride_h != 2 || g.stride_w != 2 || g.pad_top != 0 || g.pad_left != 0) return false;
  for (index_t oh = 0; oh < g.Ho; ++oh) {
    const float* __restrict r0 = xp + 2 * oh * g.W;
    const float* __restrict r1 = r0 + g.W;
    float* __restrict yr = yp + oh * g.Wo;
    for (index_t ow = 0; ow < g.Wo; ++ow)
      yr[ow] = nan_max(nan_max(r0[2 * ow], r0[2 * ow + 1]), nan_max(r1[2 * ow], r1[2 * ow + 1]));
  }
  return true;
}

inline void plane(const PoolGeometry& g, const float* __restrict xp, float* __restrict yp, std::vector<float>& s) {
  if (plane_2x2(g, xp, yp)) return;
  const float lowest = -std::numeric_limits<float>::infinity();
  const index_t sw = g.stride_w, kw = g.kw;
  const index_t Wp = std::max<index_t>((g.Wo - 1) * sw + kw, g.pad_left + g.W) + sw;  // padded row, -inf outside
  const index_t We = (Wp + 1) / 2;
  const index_t n_hmax = g.H * g.Wo;
  const index_t need = n_hmax + Wp + 2 * We;
  if (static_cast<index_t>(s.size()) < need) s.resize(static_cast<std::size_t>(need));
  float* __restrict hmax = s.data();  // hmax[h][ow]: max over the kernel's columns of input row h
  float* __restrict rp = hmax + n_hmax;
  float* __restrict ev = rp + Wp;  // stride 2: even and odd columns of the padded row, so that loads are contiguous
  float* __restrict od = ev + We;
  std::fill(rp, rp + Wp, lowest);
  for (index_t h = 0; h < g.H; ++h) {
    std::copy(xp + h * g.W, xp + (h + 1) * g.W, rp + g.pad_left);
    float* __restrict out = hmax + h * g.Wo;
    if (sw == 2) {
      for (index_t j = 0; j < We; ++j) {
        ev[j] = rp[2 * j];
        od[j] = 2 * j + 1 < Wp ? rp[2 * j + 1] : lowest;
      }
      if (kw == 3) {
        for (index_t ow = 0; ow < g.Wo; ++ow) out[ow] = nan_max(nan_max(ev[ow], od[ow]), ev[ow + 1]);
      } else {
        for (index_t ow = 0; ow < g.Wo; ++ow) out[ow] = lowest;
        for (index_t k = 0; k < kw; ++k) {
          const float* __restrict src = (k % 2 ? od : ev) + k / 2;
          for (index_t ow = 0; ow < g.Wo; ++ow) out[ow] = nan_max(src[ow], out[ow]);
        }
      }
    } else {
      for (index_t ow = 0; ow < g.Wo; ++ow) {
        float v = lowest;
        for (index_t k = 0; k < kw; ++k) v = nan_max(rp[ow * sw + k], v);
        out[ow] = v;
      }
    }
  }
  for (index_t oh = 0; oh < g.Ho; ++oh) {
    const index_t h0 = oh * g.stride_h - g.pad_top;
    const index_t a = std::max<index_t>(h0, 0), b = std::min<index_t>(h0 + g.kh, g.H);
    float* __restrict yr = yp + oh * g.Wo;
    std::fill(yr, yr + g.Wo, lowest);
    for (index_t h = a; h < b; ++h) {
      const float* __restrict src = hmax + h * g.Wo;
      for (index_t ow = 0; ow < g.Wo; ++ow) yr[ow] = nan_max(src[ow], yr[ow]);
    }
  }
}

}  // namespace pool_detail

inline void max_pool_forward(const PoolGeometry& g, const float* x, float* y, int threads) {
  const index_t planes = g.N * g.C, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    std::vector<float>& s = pool_detail::scratch();
#pragma omp for schedule(static)
    for (index_t p = 0; p < planes; ++p) pool_detail::plane(g, x + p * in_plane, y + p * out_plane, s);
  }
}
