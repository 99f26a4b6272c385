// The CPU backend's fused step epilogues, as seen from its host driver (driver.h and the files it
// lists: mlstm_cpu.cpp, pack.cpp, forward.cpp, backward.cpp).
//
// Legend (as in fastmlstm/ops/interface.py)
//   T time steps    B batch rows    H hidden units    G = 4 gates, order i, f, o, u
//   D: the activation dtype (float, c10::BFloat16 or c10::Half); every value the contract stores
//      in the activation dtype (h, m, proj, the saved gates, the gradients) is a D.
//   E: the dtype of the GEMM operands the driver feeds the GEMMs with: float, or D itself where the
//      CPU multiplies D x D -> float natively (bfloat16 on AVX-512-BF16/AMX). An E buffer only ever
//      holds values that are exactly representable in D, so the products are the same either way.
//
// The driver runs each step's two GEMMs as a loop over column blocks (at::parallel_for) and, per
// block, over row blocks; right after a tile's GEMM the matching epilogue below consumes the tile
// while it is still in L1. Every pointer argument is already offset to the tile's first row and
// first hidden unit n0; ld_* are row strides in elements. Tiles hold at most kRowBlock rows and
// one column block. A null pointer means "absent" (no saving, no lengths, no gradient).
//
// Layouts (row-major):
//   proj_t  [B, 5H] D   gate pre-activations x Wx + b (i, f, o, u), then xm = x Wmx
//   act_t   [B, 6H] D   saved gates i, f, o, u, then xm, then hm = h Wmh^T
//   dproj_t [B, 5H] D   dz (4H), then dxm
//   forward z tile: the GEMM's columns are interleaved per block of q units, [i(q) f(q) o(q) u(q)],
//   so that one tile holds the four gates of the same q units (the packed weight is permuted so).
//
// Numerics (the contract): loads widen to float32, arithmetic is float32, stores round to D (round
// to nearest even); c, dh and dc stay float32. The formulas follow fastmlstm/ops/reference/recurrence.py.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastmlstm {
namespace cpu {

constexpr int64_t kGates = 4;
// Column blocks of the packed weights (hidden units for the m GEMMs, gate columns for z: units x 4
// gates) are kNarrowColumns or kWideColumns wide, chosen per packed weight (driver.h, "Packed
// weights"): the wide blocks give the AVX-512 epilogues whole 16-float vectors per gate; the narrow
// ones suit AVX2's 8-float vectors (see bench/kernels/NOTES-cpu.md). A tile's float32 rows are
// one block wide (ld = its width). Tiles hold at most kRowBlock rows.
constexpr int64_t kNarrowColumns = 32;
constexpr int64_t kWideColumns = 64;
constexpr int64_t kMaxColumns = kWideColumns;
constexpr int64_t kRowBlock = 64;

template <typename D, typename E>
struct StepKernels {
  // hm (GEMM tile, f32) -> m = xm * hm rounded to D, written as E for the next GEMM; with act,
  // saves xm and hm (rounded to D). xm comes as D (xm_d: proj's last H columns, or the bfloat16 xm
  // GEMM's output), or, when xm_d is null, as float32 (xm_f, rounded to D first, as if it had been
  // stored in proj).
  void (*forward_m)(int64_t rows, int64_t width, int64_t H, const float* hm, int64_t ld_hm, const D* xm_d,
                    int64_t ld_xm_d, const float* xm_f, int64_t ld_xm_f, E* m, int64_t ld_m, D* act,
                    int64_t ld_act);

  // z (GEMM tile, f32, interleaved [i f o u] x units) + the gate columns of proj (nullable; with
  // ld_proj = 0 the same [4H] bias for every row) -> gates, c_t, h_t.
  // h (E, the next GEMM's operand) and c hold step t-1's state on entry and step t's on exit; rows
  // with t >= lengths[row] keep both. out receives h_t (D), cell c_t, act the gates.
  void (*forward_cell)(int64_t rows, int64_t units, int64_t H, const float* z, int64_t ld_z, const D* proj,
                       int64_t ld_proj, E* h, int64_t ld_h, float* c, int64_t ld_c, D* out, int64_t ld_out,
                       float* cell, int64_t ld_cell, D* act, int64_t ld_act, const int64_t* lengths, int64_t t);

  // Rows that are past their length (and skipped by the GEMMs): carry h and c into out and cell.
  void (*carry_state)(int64_t rows, int64_t H, const E* h, int64_t ld_h, const float* c, int64_t ld_c, D* out,
                      int64_t ld_out, float* cell, int64_t ld_cell);

  // The cell derivatives of step t for `width` units (plain gate order). rec (nullable at t = T-1)
  // is the GEMM tile dhm_{t+1} Wmh. dh holds on entry the gradient that reached h_{t+1} and on exit
  // that of h_t; dc that of c_t, then of c_{t-1}. dz goes to dproj (D) and, if not null, to dz_op
  // (E, [B, 4H], the next GEMM's operand).
  void (*backward_cell)(int64_t rows, int64_t width, int64_t H, const float* rec, int64_t ld_rec, float* dh,
                        float* dc, int64_t ld_state, const D* dout, int64_t ld_dout, const float* dcells,
                        int64_t ld_dcells, const D* act, int64_t ld_act, const float* c, const float* c_prev,
                        int64_t ld_c, D* dproj, int64_t ld_dproj, E* dz_op, int64_t ld_dz, const int64_t* lengths,
                        int64_t t);

  // dm = dz Wh (GEMM tile, f32) -> dxm = dm * hm into dproj's last H columns, dhm = dm * xm into
  // grad_hm (D) and, if not null, dhm_op (E, the next GEMM's operand).
  void (*backward_m)(int64_t rows, int64_t width, int64_t H, const float* dm, int64_t ld_dm, const D* act,
                     int64_t ld_act, D* dproj, int64_t ld_dproj, D* dhm, int64_t ld_dhm, E* dhm_op, int64_t ld_op);

  // The gradient of h0: out = rec + dh for rows that never started (0 >= lengths[row]), rec elsewhere.
  void (*grad_h0)(int64_t rows, int64_t width, const float* rec, int64_t ld_rec, const float* dh, int64_t ld_dh,
                  float* out, int64_t ld_out, const int64_t* lengths);
};

// m = xm * hm of saved rows (act [R, 6H] -> m [R, H], float holding the D values).
template <typename D>
using RecomputeM = void (*)(int64_t rows, int64_t H, const D* act, float* m);

// Widening copy of a [rows, cols] block (row stride ld_in) into a dense float block.
template <typename D>
using Widen = void (*)(int64_t rows, int64_t cols, const D* in, int64_t ld_in, float* out);

// dst [cols, rows] (row stride ld_dst) = the transpose of src [rows, cols] (row stride ld_src):
// the A operand of the weight gradients' micro-kernel tiles (backward.cpp) and the packs (pack.cpp,
// which also move pairs of bfloat16 values through it as 32-bit words: it copies bits, never values).
using Transpose = void (*)(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst);

// C [M, N] (float32, row stride cols) = A [M, K] (float32, row stride lda) x B, for a block of
// weights kept in their 16-bit dtype W ([K, cols], zero-padded; cols is kNarrowColumns or
// kWideColumns): the GEMM of small batches (generation), where reading the weights is the whole
// cost and 16-bit weights halve it.
template <typename W>
using SmallGemm = void (*)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const W* B, int64_t cols,
                           float* C);

// C [M, N] (float32, row stride cols) (+)= A [M, K] (bfloat16, row stride lda) x a VNNI block
// [K/2, cols, 2] (bfloat16, K even): the portable twin of the native bfloat16
// micro-kernels (oneDNN on AVX-512-BF16 or AMX). It reads the same packed layout and forms the same
// products (a product of two bfloat16 values is exact in float32) in the order of the CPU's bf16
// dot-product instruction (per pair of k, the odd one first), so every CPU can run and test the
// VNNI path: a packing or indexing bug cannot hide on machines without the instruction.
using VnniGemm = void (*)(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                          const c10::BFloat16* B, int64_t cols, float* C, bool add_C);

// 64-bit fingerprint of a byte range: position dependent (a permutation or a one-bit change gives
// another value), not cryptographic; for the effective-weight cache's "did this parameter change".
using Fingerprint = uint64_t (*)(const void* data, int64_t bytes);

// One set per instruction set: kernels_default.cpp (portable C++, the twin every other set is
// tested against) and, on x86-64, kernels_avx2.cpp and kernels_avx512.cpp.
#define FASTMLSTM_DECLARE_KERNELS(isa)                                                  \
  namespace isa {                                                                      \
  template <typename D, typename E>                                                    \
  const StepKernels<D, E>& step_kernels();                                             \
  template <typename D>                                                                \
  RecomputeM<D> recompute_m();                                                         \
  template <typename D>                                                                \
  Widen<D> widen();                                                                    \
  template <typename W>                                                                \
  SmallGemm<W> small_gemm();                                                           \
  VnniGemm vnni_gemm();                                                                \
  Transpose transpose();                                                               \
  uint64_t fingerprint(const void* data, int64_t bytes);                               \
  }

FASTMLSTM_DECLARE_KERNELS(isa_default)
#if defined(__x86_64__) || defined(_M_X64)
#define FASTMLSTM_HAVE_AVX2_KERNELS 1
#define FASTMLSTM_HAVE_AVX512_KERNELS 1
FASTMLSTM_DECLARE_KERNELS(isa_avx2)
FASTMLSTM_DECLARE_KERNELS(isa_avx512)
#endif

}  // namespace cpu
}  // namespace fastmlstm
