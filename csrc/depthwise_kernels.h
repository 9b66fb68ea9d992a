// Pruned depthwise convolution: a direct per-channel kernel that visits only the kept taps of each channel.
//
// Included only by kernels_isa.cpp inside one ISA namespace (see isa.h). On a CPU this beats a DR-GEMM emulation:
// the work is proportional to the kept taps. Per (image, channel) plane the input is copied once into a zero-padded
// thread-local buffer (for stride 2 split into even and odd columns), so every kept tap is one contiguous
// multiply-add loop without bounds checks, which the compiler vectorises with the ISA's vector width:
//   stride 1: over the whole plane at once (output on the padded-width grid, the extra columns dropped at the end);
//   stride 2: row by row.
// Parallel over planes; buffers are reused across calls (no allocation in steady state).
#pragma once

#include <algorithm>
#include <vector>

#include "isa.h"

namespace depthwise_detail {

struct Scratch {
  std::vector<float> in, acc;
};

// The fused activation over n outputs (the switch sits outside the loops, so each loop vectorises).
inline void activate(float* __restrict y, index_t n, int act) {
  switch (act) {
    case act_relu:
      for (index_t i = 0; i < n; ++i) y[i] = y[i] > 0.0f ? y[i] : 0.0f;
      break;
    case act_relu6:
      for (index_t i = 0; i < n; ++i) y[i] = std::min(std::max(y[i], 0.0f), 6.0f);
      break;
    case act_hardswish:
      for (index_t i = 0; i < n; ++i) y[i] = y[i] * std::min(std::max(y[i] + 3.0f, 0.0f), 6.0f) * (1.0f / 6.0f);
      break;
    case act_silu:
      for (index_t i = 0; i < n; ++i) y[i] = y[i] / (1.0f + std::exp(-y[i]));
      break;
    default:
      break;
  }
}

inline Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

inline void plane(const DepthwisePlanView& pl, const DepthwiseGeometry& g, index_t c, const float* __restrict xp,
                  float* __restrict yp, Scratch& s) {
  const float b = pl.bias ? pl.bias[c] : 0.0f;
  const index_t t0 = pl.tap_begin[c], t1 = pl.tap_begin[c + 1];
  const index_t sh = pl.stride_h, sw = pl.stride_w;
  // padded extent: every input row/column any output reads (including the implied bottom/right padding)
  const index_t Hp = std::max<index_t>((g.Ho - 1) * sh + pl.kh, g.pad_top + g.H);
  const index_t Wp = std::max<index_t>((g.Wo - 1) * sw + pl.kw, g.pad_left + g.W);
  if (sh == 1 && sw == 1) {
    const index_t n_in = (Hp + 1) * Wp + pl.kw, n_acc = g.Ho * Wp;
    if (static_cast<index_t>(s.in.size()) < n_in) s.in.resize(n_in);
    if (static_cast<index_t>(s.acc.size()) < n_acc) s.acc.resize(n_acc);
    float* __restrict in = s.in.data();
    float* __restrict acc = s.acc.data();
    std::fill(in, in + n_in, 0.0f);
    for (index_t h = 0; h < g.H; ++h) std::copy(xp + h * g.W, xp + (h + 1) * g.W, in + (h + g.pad_top) * Wp + g.pad_left);
    std::fill(acc, acc + n_acc, b);
    for (index_t t = t0; t < t1; ++t) {
      const float w = pl.tap_w[t];
      const float* __restrict src = in + pl.tap_dy[t] * Wp + pl.tap_dx[t];
      for (index_t i = 0; i < n_acc; ++i) acc[i] += w * src[i];
    }
    for (index_t oh = 0; oh < g.Ho; ++oh) std::copy(acc + oh * Wp, acc + oh * Wp + g.Wo, yp + oh * g.Wo);
    activate(yp, g.Ho * g.Wo, pl.act);
    return;
  }
  // general stride: split the padded columns by phase (column index mod sw), so tap dx reads phase dx % sw from
  // offset dx / sw contiguously
  const index_t We = (Wp + sw - 1) / sw;  // columns per phase
  const index_t n_in = sw * Hp * We;
  if (static_cast<index_t>(s.in.size()) < n_in) s.in.resize(n_in);
  float* __restrict in = s.in.data();
  std::fill(in, in + n_in, 0.0f);
  if (sw == 2) {
    // copy each row into a zero-padded temporary, then split even / odd columns with vector shuffles
    typedef float dv __attribute__((vector_size(VW * 4), aligned(4), __may_alias__));
    typedef int di __attribute__((vector_size(VW * 4)));
    di even{}, odd{};
    for (int l = 0; l < VW; ++l) {
      even[l] = 2 * l;
      odd[l] = 2 * l + 1;
    }
    const index_t n_row = 2 * (We + VW);
    if (static_cast<index_t>(s.acc.size()) < n_row) s.acc.resize(n_row);
    float* __restrict row = s.acc.data();
    std::fill(row, row + n_row, 0.0f);
    for (index_t h = 0; h < g.H; ++h) {
      std::copy(xp + h * g.W, xp + (h + 1) * g.W, row + g.pad_left);
      float* __restrict e = in + (h + g.pad_top) * We;
      float* __restrict o = in + (Hp + h + g.pad_top) * We;
      index_t j = 0;
      for (; j + VW <= We; j += VW) {
        const dv a = *reinterpret_cast<const dv*>(row + 2 * j), bb = *reinterpret_cast<const dv*>(row + 2 * j + VW);
        *reinterpret_cast<dv*>(e + j) = __builtin_shuffle(a, bb, even);
        *reinterpret_cast<dv*>(o + j) = __builtin_shuffle(a, bb, odd);
      }
      for (; j < We; ++j) {
        e[j] = row[2 * j];
        o[j] = row[2 * j + 1];
      }
    }
  } else {
    for (index_t ph = 0; ph < sw; ++ph) {
      // phase ph holds padded columns j * sw + ph, i.e. input columns w = j * sw + ph - pad_left in [0, W)
      const index_t j0 = std::max<index_t>(0, (g.pad_left - ph + sw - 1) / sw);
      const index_t j1 = std::min<index_t>(We, (g.W + g.pad_left - ph + sw - 1) / sw);
      for (index_t h = 0; h < g.H; ++h) {
        float* __restrict dst = in + (ph * Hp + h + g.pad_top) * We;
        const float* __restrict src = xp + h * g.W + ph - g.pad_left;
        for (index_t j = j0; j < j1; ++j) dst[j] = src[j * sw];
      }
    }
  }
  for (index_t oh = 0; oh < g.Ho; ++oh) {
    float* __restrict yr = yp + oh * g.Wo;
    for (index_t ow = 0; ow < g.Wo; ++ow) yr[ow] = b;
    for (index_t t = t0; t < t1; ++t) {
      const float w = pl.tap_w[t];
      const index_t dx = pl.tap_dx[t];
      const float* __restrict src = in + ((dx % sw) * Hp + oh * sh + pl.tap_dy[t]) * We + dx / sw;
      for (index_t ow = 0; ow < g.Wo; ++ow) yr[ow] += w * src[ow];
    }
  }
  activate(yp, g.Ho * g.Wo, pl.act);
}

}  // namespace depthwise_detail

inline void depthwise_forward(const DepthwisePlanView& pl, const DepthwiseGeometry& g, const float* x, float* y,
                              int threads) {
  const index_t planes = g.N * pl.C, in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    depthwise_detail::Scratch& s = depthwise_detail::scratch();
#pragma omp for schedule(static)
    for (index_t nc = 0; nc < planes; ++nc)
      depthwise_detail::plane(pl, g, nc % pl.C, x + nc * in_plane, y + nc * out_plane, s);
  }
}
