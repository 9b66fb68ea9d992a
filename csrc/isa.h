// Runtime ISA dispatch for the compute kernels (torch-free).
//
// The compute kernels (winograd_conv_kernels.h, depthwise_kernels.h) are written once on GCC/Clang vector extensions
// and compiled three times by kernels_isa.cpp, each time into its own namespace and with its own flags:
//   isa_generic : the x86-64 / any-architecture baseline (SSE2 on x86-64), always built;
//   isa_avx2    : -mavx2 -mfma                        (x86-64 only);
//   isa_avx512  : -mavx512f -mavx512vl -mavx512dq -mfma (x86-64 only).
// Nothing outside those namespaces is compiled with AVX flags, so the extension loads on any x86-64 CPU; the widest
// ISA the CPU supports is picked at run time (WINOPRUNE_ISA=generic|avx2|avx512 forces a narrower one).
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace winoprune {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };

// The activation fused into a kernel's output stage (after the bias). This is the one table of activations: the
// extension exports activation_names (code i is activation_names[i]) and lightning_winoprune.deploy's Activation
// enum must list the same names in the same order (checked when the ops are registered).
enum Activation : int { act_none = 0, act_relu = 1, act_relu6 = 2, act_silu = 3, act_hardswish = 4 };
constexpr int n_activations = 5;
constexpr const char* activation_names[n_activations] = {"none", "relu", "relu6", "silu", "hardswish"};

// A layer plan packed for one ISA (panel height MR and vector width depend on it). Raw views, owned elsewhere.
struct WinogradPlanView {
  int p, m;                          // tile size p = m + 2
  index_t K, C;                      // output / input channels
  int mr;                            // panel height the A panels were packed with
  bool csr;                          // element-sparse (WWP) CSR form instead of panels
  // panels (csr == false): the panels of Winograd position xi are [panel_begin[xi], panel_begin[xi + 1])
  const index_t* panel_begin;        // (P2 + 1)
  const index_t* panel_xi;           // (n_panels) Winograd position of every panel
  const index_t* panel_row_begin;    // (n_panels + 1) into panel_rows; a panel is mr, 2mr/3 or mr/3 rows high
  const index_t* panel_rows;         // output rows of every panel; K marks a padding row (written to a scratch row)
  const std::uint8_t* panel_row_acc; // per panel row: 1 = add to the row (an earlier panel of the position stored it)
  index_t n_items;                   // GEMM work items: ranges of panels that must run in order (they share rows)
  const index_t* item_begin;         // (n_items + 1) into the panels
  const index_t* panel_col_begin;    // (n_panels + 1) into panel_cols
  const index_t* panel_a_begin;      // (n_panels + 1) into A
  const std::int32_t* panel_cols;    // kept input channels of every panel
  const float* A;                    // packed weights: per panel (n_cols, mr), row-major
  // rows never written by any panel of xi (their M rows must read as zero): [zero_begin[xi], zero_begin[xi + 1])
  const index_t* zero_begin;         // (P2 + 1)
  const index_t* zero_rows;
  // CSR (csr == true): row r = xi * K + k holds entries [row_ptr[r], row_ptr[r + 1])
  const index_t* row_ptr;            // (P2 * K + 1)
  const std::int32_t* csr_cols;
  const float* csr_vals;
  const float* bias;                 // (K) or nullptr
  int act;                           // Activation applied after the bias
};

// The bfloat16 multiply of a Winograd conv (winograd_bf16.h, winograd_bf16_kernels.h): AMX tiles (TDPBF16PS) where
// the CPU has them, VDPBF16PS rows on AVX512-BF16 CPUs without AMX; none elsewhere (no bfloat16 kernels).
enum class Bf16Path : int { none = 0, avx512bf16 = 1, amx = 2 };
constexpr index_t kBf16Rows = 16;   // output rows of a bfloat16 panel (AMX tile rows)
constexpr index_t kBf16Chunk = 32;  // input channels of a chunk (bfloat16 values in an AMX tile row)

// float -> bfloat16 bits, rounded to nearest even (what VCVTNEPS2BF16 does); NaN stays a quiet NaN.
inline std::uint16_t to_bf16(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<std::uint16_t>(b >> 16);
}

// A plan packed for the bfloat16 kernels: panels of 16 output rows by kept 32-channel chunks (see winograd_bf16.h).
struct WinogradBf16View {
  int p, m;
  index_t K, C;
  index_t n_panels;
  const index_t* panel_xi;           // (n_panels) Winograd position of every panel
  const index_t* panel_rows;         // (n_panels * 16) output row of every panel row; K marks a padding row
  const index_t* chunk_begin;        // (n_panels + 1) into chunks
  const std::int32_t* chunks;        // kept 32-channel chunks of every panel
  const std::uint16_t* A;            // bfloat16 weights: 16 x 32 row-major per (panel, kept chunk)
  const index_t* row_map;            // (P2 * K) row of the compacted M holding (xi, k), -1 when pruned
  const float* bias;                 // (K) or nullptr
  int act;                           // Activation applied after the bias
};

// A training tile transform's geometry (winograd_tiles.h, training_kernels.h).
struct TileGeometry {
  index_t N, C, H, W;          // shape of the NCHW tensor on the spatial side (x for input, y for output)
  index_t pad_top, pad_left;   // input only: zero padding before the first row / column
  index_t th, tw;              // tiles per column / row
};

// Row (of T floats) of M / dM that holds Winograd position xi of output channel k. Without a row map, the dense
// (P2, K, T) layout: xi * K + k. With one (the sparse training route's gathered M), rows[xi * K + k], or -1 for an
// absent row: all zero, read as zeros and never written.
inline index_t tile_row(const std::int64_t* rows, int xi, index_t K, index_t k) {
  return rows ? static_cast<index_t>(rows[xi * K + k]) : xi * K + k;
}

struct ConvGeometry {
  index_t N, H, W;        // input batch and spatial size (channels come from the plan)
  index_t pad_top, pad_left;
  index_t Ho, Wo;         // output spatial size; input pixels outside [0, H) x [0, W) read as zero
};

// A pruned depthwise conv: per channel, the kept taps of its (kh, kw) kernel.
struct DepthwisePlanView {
  index_t C;
  int kh, kw, stride_h, stride_w;
  const index_t* tap_begin;          // (C + 1)
  const std::int32_t* tap_dy;        // kernel row of each kept tap
  const std::int32_t* tap_dx;        // kernel column of each kept tap
  const float* tap_w;                // its weight
  const float* bias;                 // (C) or nullptr
  int act;                           // Activation applied after the bias
};

struct DepthwiseGeometry {
  index_t N, H, W, pad_top, pad_left, Ho, Wo;
};

// Max pooling: (N, C, H, W) -> (N, C, Ho, Wo), kernel (kh, kw), stride, top/left padding (dilation 1).
struct PoolGeometry {
  index_t N, C, H, W, Ho, Wo;
  index_t kh, kw, stride_h, stride_w, pad_top, pad_left;
};

// Thread-seconds a Winograd forward spent in each stage of its tile blocks, summed over the threads (the kernel adds
// to it when a caller passes one; nullptr: nothing is timed). Threads that share a block time each stage's whole
// parallel loop, their wait for the slowest thread included.
struct StageSeconds {
  double input = 0.0, gemm = 0.0, output = 0.0;
};

// One ISA's entry points. Workspace sizes are in floats; workspaces are caller-owned (no allocation per call).
struct KernelTable {
  Isa isa;
  const char* name;
  int vector_width;   // floats per vector register
  int mr;             // panel height used when packing for this ISA
  index_t (*winograd_workspace)(const WinogradPlanView&, const ConvGeometry&, int threads);
  void (*winograd_forward)(const WinogradPlanView&, const ConvGeometry&, const float* x, float* y, float* workspace,
                           index_t workspace_size, int threads, StageSeconds* stages);
  // Multiply-add throughput of this ISA's vectors on `threads` threads (GFLOP/s, 2 per FMA lane): independent FMA
  // chains in registers for `iters` rounds, the bound a compute kernel on this ISA can reach.
  double (*fma_peak_gflops)(int threads, index_t iters);
  // The bfloat16 Winograd conv (bfloat16 multiply with float32 sums) on `path`: float32 NCHW x and y, or with
  // nhwc bfloat16 NHWC ones; nullptr where this ISA has no bfloat16 kernels. Workspace sizes are in floats.
  index_t (*winograd_bf16_workspace)(const WinogradBf16View&, const ConvGeometry&, int threads);
  void (*winograd_bf16_forward)(const WinogradBf16View&, const ConvGeometry&, const void* x, void* y, bool nhwc,
                                float* workspace, index_t workspace_size, int threads, Bf16Path path,
                                StageSeconds* stages);
  void (*depthwise_forward)(const DepthwisePlanView&, const DepthwiseGeometry&, const float* x, float* y,
                            int threads);
  void (*max_pool_forward)(const PoolGeometry&, const float* x, float* y, int threads);
  // Training tile transforms (layouts in winograd_tiles.h) with the transform matrices of train_BT / train_AT.
  // Each returns false when p has no vector kernel here (then the caller runs the scalar reference).
  const float* (*train_BT)(int p);  // (p, p) row-major, or nullptr when p is unsupported
  const float* (*train_AT)(int p);  // (p - 2, p)
  bool (*train_input)(const float* x, const TileGeometry& g, int p, float* V, int threads);
  bool (*train_input_adjoint)(const float* dV, const TileGeometry& g, int p, float* dx, int threads);
  // rows: optional row map of M / dM (see tile_row).
  bool (*train_output)(const float* M, const TileGeometry& g, const float* bias, const std::int64_t* rows, int p,
                       float* y, int threads);
  bool (*train_output_adjoint)(const float* dy, const TileGeometry& g, const std::int64_t* rows, int p, float* dM,
                               int threads);
};

#define WINOPRUNE_DECLARE_ISA(NS) \
  namespace NS {                  \
  const KernelTable& table();     \
  }
WINOPRUNE_DECLARE_ISA(isa_generic)
#if defined(__x86_64__) || defined(_M_X64)
WINOPRUNE_DECLARE_ISA(isa_avx2)
WINOPRUNE_DECLARE_ISA(isa_avx512)
#endif
#undef WINOPRUNE_DECLARE_ISA

// The widest ISA this CPU supports, capped by the WINOPRUNE_ISA environment variable when set.
Isa detect_isa();
// The table of an ISA; throws std::invalid_argument when the CPU (or this build) does not support it.
const KernelTable& kernel_table(Isa isa);
bool isa_supported(Isa isa);
// The fastest bfloat16 path this CPU (and this OS: AMX needs the tile state granted) supports, capped by the
// WINOPRUNE_BF16 environment variable (avx512bf16 or none) when set.
Bf16Path detect_bf16();
bool bf16_supported(Bf16Path path);

}  // namespace winoprune
