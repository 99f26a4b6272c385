// The epilogues of mlstm_cpu.h written once with ATen's at::vec::Vectorized<float>, compiled once per
// instruction set: kernels_default.cpp (whatever the compiler's baseline gives), kernels_avx2.cpp
// (AVX2 + FMA + F16C) and kernels_avx512.cpp (AVX-512 F/BW/VL/DQ). Each includer defines
// FASTMLSTM_ISA, the namespace its copy lands in; the driver picks one at run time
// (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
//
// Legend and layouts: mlstm_cpu.h. Inner loops run over hidden units, V at a time (V = the vector
// width in floats), with a partial vector at the tail; the same expressions, in the same order, as
// the reference loop (sigmoid as 1 / (1 + exp(0 - x)), like torch.sigmoid's CPU kernel). The vector
// helpers they share (loads, stores, rounding, sigmoid and tanh on a fast exp): mlstm_cpu_vec.h.
//
// This header must not define static data with dynamic initialization: the AVX2 and AVX-512 copies
// are compiled for those sets and their initializers would run when the library loads, on any CPU.
#pragma once

#ifndef FASTMLSTM_ISA
#error "define FASTMLSTM_ISA (the namespace of this copy of the kernels) before including mlstm_cpu_kernels.h"
#endif

#include "mlstm_cpu.h"
#include "mlstm_cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastmlstm {
namespace cpu {
namespace FASTMLSTM_ISA {
namespace {

template <typename D, typename E>
void forward_m(int64_t rows, int64_t width, int64_t H, const float* hm, int64_t ld_hm, const D* xm_d,
               int64_t ld_xm_d, const float* xm_f, int64_t ld_xm_f, E* m, int64_t ld_m, D* act, int64_t ld_act) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* hm_r = hm + r * ld_hm;
    const D* xm_proj = xm_d != nullptr ? xm_d + r * ld_xm_d : nullptr;
    const float* xm_tile = xm_d != nullptr ? nullptr : xm_f + r * ld_xm_f;
    E* m_r = m + r * ld_m;
    D* act_r = act != nullptr ? act + r * ld_act : nullptr;
    for (int64_t k = 0; k < width; k += V) {
      const int64_t n = std::min(V, width - k);
      const Vec hm_v = load(hm_r + k, n);
      const Vec xm_v = xm_proj != nullptr ? load(xm_proj + k, n) : round_to<D>(load(xm_tile + k, n));
      store(m_r + k, round_to<D>(hm_v * xm_v), n);
      if (act_r != nullptr) {
        store(act_r + 4 * H + k, xm_v, n);
        store(act_r + 5 * H + k, hm_v, n);
      }
    }
  }
}

template <typename D, typename E>
void forward_cell(int64_t rows, int64_t units, int64_t H, const float* z, int64_t ld_z, const D* proj,
                  int64_t ld_proj, E* h, int64_t ld_h, float* c, int64_t ld_c, D* out, int64_t ld_out, float* cell,
                  int64_t ld_cell, D* act, int64_t ld_act, const int64_t* lengths, int64_t t) {
  const int64_t q = units;  // the tile's columns: [i(q) f(q) o(q) u(q)]
  for (int64_t r = 0; r < rows; ++r) {
    const bool active = lengths == nullptr || t < lengths[r];
    const float* z_r = z + r * ld_z;
    const D* x_r = proj != nullptr ? proj + r * ld_proj : nullptr;
    E* h_r = h + r * ld_h;
    float* c_r = c + r * ld_c;
    D* out_r = out + r * ld_out;
    float* cell_r = cell != nullptr ? cell + r * ld_cell : nullptr;
    D* act_r = act != nullptr ? act + r * ld_act : nullptr;
    for (int64_t k = 0; k < q; k += V) {
      const int64_t n = std::min(V, q - k);
      Vec zi = load(z_r + k, n), zf = load(z_r + q + k, n), zo = load(z_r + 2 * q + k, n),
          zu = load(z_r + 3 * q + k, n);
      if (x_r != nullptr) {
        zi = zi + load(x_r + k, n);
        zf = zf + load(x_r + H + k, n);
        zo = zo + load(x_r + 2 * H + k, n);
        zu = zu + load(x_r + 3 * H + k, n);
      }
      const Vec i = sigmoid(zi);
      const Vec f = sigmoid(zf);
      const Vec o = sigmoid(zo);
      const Vec u = tanh(zu);
      const Vec c_prev = load(c_r + k, n);
      Vec c_new = f * c_prev + i * u;
      Vec h_new = round_to<D>(o * tanh(c_new));
      if (!active) {
        // Past its length a row keeps its state: h and c are carried through unchanged.
        c_new = c_prev;
        h_new = load(h_r + k, n);
      }
      store(c_r + k, c_new, n);
      store(h_r + k, h_new, n);
      store(out_r + k, h_new, n);
      if (cell_r != nullptr) {
        store(cell_r + k, c_new, n);
      }
      if (act_r != nullptr) {
        store(act_r + k, i, n);
        store(act_r + H + k, f, n);
        store(act_r + 2 * H + k, o, n);
        store(act_r + 3 * H + k, u, n);
      }
    }
  }
}

template <typename D, typename E>
void carry_state(int64_t rows, int64_t H, const E* h, int64_t ld_h, const float* c, int64_t ld_c, D* out,
                 int64_t ld_out, float* cell, int64_t ld_cell) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < H; k += V) {
      const int64_t n = std::min(V, H - k);
      store(out + r * ld_out + k, load(h + r * ld_h + k, n), n);
      if (cell != nullptr) {
        store(cell + r * ld_cell + k, load(c + r * ld_c + k, n), n);
      }
    }
  }
}

template <typename D, typename E>
void backward_cell(int64_t rows, int64_t width, int64_t H, const float* rec, int64_t ld_rec, float* dh, float* dc,
                   int64_t ld_state, const D* dout, int64_t ld_dout, const float* dcells, int64_t ld_dcells,
                   const D* act, int64_t ld_act, const float* c, const float* c_prev, int64_t ld_c, D* dproj,
                   int64_t ld_dproj, E* dz_op, int64_t ld_dz, const int64_t* lengths, int64_t t) {
  const Vec one(1.0f);
  const Vec zero(0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const bool has_len = lengths != nullptr;
    const int64_t len = has_len ? lengths[r] : 0;
    const bool active = !has_len || t < len;
    // A row that was padding at t + 1 passed h_t through unchanged: the gradient that reached
    // h_{t+1} passes straight back as well, on top of the one through hm_{t+1}.
    const bool passed_through = has_len && t + 1 >= len;
    float* dh_r = dh + r * ld_state;
    float* dc_r = dc + r * ld_state;
    const D* a = act + r * ld_act;
    const float* c_r = c + r * ld_c;
    const float* cp_r = c_prev + r * ld_c;
    D* dz_r = dproj + r * ld_dproj;
    E* op_r = dz_op != nullptr ? dz_op + r * ld_dz : nullptr;
    for (int64_t k = 0; k < width; k += V) {
      const int64_t n = std::min(V, width - k);
      Vec dh_v = load(dh_r + k, n);
      if (rec != nullptr) {
        const Vec rec_v = load(rec + r * ld_rec + k, n);
        dh_v = passed_through ? rec_v + dh_v : rec_v;
      }
      if (dout != nullptr) {
        dh_v = dh_v + load(dout + r * ld_dout + k, n);
      }
      store(dh_r + k, dh_v, n);
      Vec dc_v = load(dc_r + k, n);
      if (dcells != nullptr) {
        dc_v = dc_v + load(dcells + r * ld_dcells + k, n);
      }
      Vec dzi = zero, dzf = zero, dzo = zero, dzu = zero;
      if (active) {
        const Vec i = load(a + k, n);
        const Vec f = load(a + H + k, n);
        const Vec o = load(a + 2 * H + k, n);
        const Vec u = load(a + 3 * H + k, n);
        const Vec tanh_c = tanh(load(c_r + k, n));
        dc_v = dc_v + dh_v * o * (one - tanh_c * tanh_c);
        dzi = dc_v * u * i * (one - i);
        dzf = dc_v * load(cp_r + k, n) * f * (one - f);
        dzo = dh_v * tanh_c * o * (one - o);
        dzu = dc_v * i * (one - u * u);
        dc_v = dc_v * f;
      }
      // A padded step is the identity on c: its gradient passes through, its gates get none.
      store(dc_r + k, dc_v, n);
      const Vec dz[4] = {round_to<D>(dzi), round_to<D>(dzf), round_to<D>(dzo), round_to<D>(dzu)};
      for (int64_t g = 0; g < kGates; ++g) {
        store(dz_r + g * H + k, dz[g], n);
        if (op_r != nullptr) {
          store(op_r + g * H + k, dz[g], n);
        }
      }
    }
  }
}

template <typename D, typename E>
void backward_m(int64_t rows, int64_t width, int64_t H, const float* dm, int64_t ld_dm, const D* act,
                int64_t ld_act, D* dproj, int64_t ld_dproj, D* dhm, int64_t ld_dhm, E* dhm_op, int64_t ld_op) {
  for (int64_t r = 0; r < rows; ++r) {
    const D* a = act + r * ld_act;
    for (int64_t k = 0; k < width; k += V) {
      const int64_t n = std::min(V, width - k);
      const Vec dm_v = load(dm + r * ld_dm + k, n);
      store(dproj + r * ld_dproj + 4 * H + k, dm_v * load(a + 5 * H + k, n), n);
      const Vec dhm_v = round_to<D>(dm_v * load(a + 4 * H + k, n));
      store(dhm + r * ld_dhm + k, dhm_v, n);
      if (dhm_op != nullptr) {
        store(dhm_op + r * ld_op + k, dhm_v, n);
      }
    }
  }
}

void grad_h0(int64_t rows, int64_t width, const float* rec, int64_t ld_rec, const float* dh, int64_t ld_dh,
             float* out, int64_t ld_out, const int64_t* lengths) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool never_started = lengths != nullptr && 0 >= lengths[r];
    for (int64_t k = 0; k < width; k += V) {
      const int64_t n = std::min(V, width - k);
      Vec v = load(rec + r * ld_rec + k, n);
      if (never_started) {
        v = v + load(dh + r * ld_dh + k, n);
      }
      store(out + r * ld_out + k, v, n);
    }
  }
}

template <typename D>
void recompute_m_impl(int64_t rows, int64_t H, const D* act, float* m) {
  for (int64_t r = 0; r < rows; ++r) {
    const D* a = act + r * 6 * H;
    for (int64_t k = 0; k < H; k += V) {
      const int64_t n = std::min(V, H - k);
      store(m + r * H + k, round_to<D>(load(a + 4 * H + k, n) * load(a + 5 * H + k, n)), n);
    }
  }
}

template <typename D>
void widen_impl(int64_t rows, int64_t cols, const D* in, int64_t ld_in, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; k += V) {
      const int64_t n = std::min(V, cols - k);
      store(out + r * cols + k, load(in + r * ld_in + k, n), n);
    }
  }
}

// kR rows of C [kR, kCols] = A [kR, K] x B [K, kCols] (16-bit B widened in registers), the row count a
// compile-time constant so that the kR x kCols / V accumulators stay in registers: with a run-time
// count the compiler kept them on the stack and every multiply-add went through memory.
template <typename W, int64_t kCols, int64_t kR>
inline void small_gemm_rows(const float* A, int64_t lda, int64_t K, const W* B, float* C) {
  constexpr int64_t kVecs = kCols / V;
  Vec acc[kR][kVecs];
  for (int64_t r = 0; r < kR; ++r) {
    for (int64_t v = 0; v < kVecs; ++v) {
      acc[r][v] = Vec(0.0f);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec b[kVecs];
    for (int64_t v = 0; v < kVecs; v += 2) {
      // A whole 16-bit vector (2 V values) at a time: at::vec's partial 16-bit loads go through memory.
      std::tie(b[v], b[v + 1]) = at::vec::convert_to_float<W>(at::vec::Vectorized<W>::loadu(B + k * kCols + v * V));
    }
    for (int64_t r = 0; r < kR; ++r) {
      const Vec a(A[r * lda + k]);
      for (int64_t v = 0; v < kVecs; ++v) {
        acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
      }
    }
  }
  for (int64_t r = 0; r < kR; ++r) {
    for (int64_t v = 0; v < kVecs; ++v) {
      acc[r][v].store(C + r * kCols + v * V);
    }
  }
}

template <typename W, int64_t kCols>
void small_gemm_cols(int64_t M, const float* A, int64_t lda, int64_t K, const W* B, float* C) {
  // All kCols columns of the block in registers for up to kRows rows at a time (as many as the
  // vector registers hold besides the weights'); the padded columns of the last block hold zero
  // weights and give zeros. Each element sums over k in order, whatever the rows taken with it.
  static_assert(kCols % (2 * V) == 0, "a weight block must hold whole pairs of vectors");
  constexpr int64_t kRows = kCols / V <= 4 ? 4 : 1;
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const float* a = A + r0 * lda;
    float* c = C + r0 * kCols;
    if constexpr (kRows == 4) {
      switch (std::min(kRows, M - r0)) {
        case 4:
          small_gemm_rows<W, kCols, 4>(a, lda, K, B, c);
          continue;
        case 3:
          small_gemm_rows<W, kCols, 3>(a, lda, K, B, c);
          continue;
        case 2:
          small_gemm_rows<W, kCols, 2>(a, lda, K, B, c);
          continue;
        default:
          break;
      }
    }
    small_gemm_rows<W, kCols, 1>(a, lda, K, B, c);
  }
}

template <typename W>
void small_gemm_impl(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const W* B, int64_t cols,
                     float* C) {
  (void)N;
  if (cols == kWideColumns) {
    small_gemm_cols<W, kWideColumns>(M, A, lda, K, B, C);
  } else {
    small_gemm_cols<W, kNarrowColumns>(M, A, lda, K, B, C);
  }
}

void vnni_gemm_impl(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                    int64_t cols, float* C, bool add_C) {
  constexpr int64_t kRows = 4;
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t rows = std::min(kRows, M - r0);
    float acc[kRows][kMaxColumns];
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        acc[r][c] = add_C && c < N ? C[(r0 + r) * cols + c] : 0.0f;
      }
    }
    for (int64_t kp = 0; kp < K / 2; ++kp) {
      const c10::BFloat16* pair = B + kp * 2 * cols;
      float even[kMaxColumns], odd[kMaxColumns];
      for (int64_t c = 0; c < cols; ++c) {
        even[c] = static_cast<float>(pair[2 * c]);
        odd[c] = static_cast<float>(pair[2 * c + 1]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float a_even = static_cast<float>(A[(r0 + r) * lda + 2 * kp]);
        const float a_odd = static_cast<float>(A[(r0 + r) * lda + 2 * kp + 1]);
        for (int64_t c = 0; c < cols; ++c) {
          // Exact products: one rounding per addition, fused or not.
          acc[r][c] = (acc[r][c] + a_odd * odd[c]) + a_even * even[c];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(C + (r0 + r) * cols, acc[r], N * sizeof(float));
    }
  }
}

}  // namespace

template <typename D, typename E>
const StepKernels<D, E>& step_kernels() {
  // Constant-initialized (function addresses only): no code runs at load time.
  static constexpr StepKernels<D, E> table{&forward_m<D, E>,     &forward_cell<D, E>, &carry_state<D, E>,
                                           &backward_cell<D, E>, &backward_m<D, E>,   &grad_h0};
  return table;
}

template <typename D>
RecomputeM<D> recompute_m() {
  return &recompute_m_impl<D>;
}

template <typename D>
Widen<D> widen() {
  return &widen_impl<D>;
}

template <typename W>
SmallGemm<W> small_gemm() {
  return &small_gemm_impl<W>;
}

VnniGemm vnni_gemm() { return &vnni_gemm_impl; }

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// dst [8, 8] = src [8, 8]^T in registers: pairs of rows interleaved, then pairs of pairs, then the
// 128-bit halves exchanged. at::vec has no AVX2 float transpose, and its AVX-512 16 x 16 one took
// 1.1-1.5x as long at the packs' and the weight gradients' shapes (bench/kernels/NOTES-cpu-kernels.md,
// "The packs").
inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_ps(src + i * ld_src);
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst = src^T: 8 x 8 blocks in registers in the AVX2 and AVX-512 copies (the edges element by
// element), at::vec's element by element loop in the portable copy (where the packs keep their
// column loop, pack.cpp, and the weight gradients MKL's GEMM, mlstm_cpu.cpp weight_grad_tiles).
void transpose_impl(int64_t rows, int64_t cols, const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
      transpose_8x8(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // the last rows % 8 rows and cols % 8 columns
    for (int64_t c = r < rows8 ? cols8 : 0; c < cols; ++c) {
      std::memcpy(dst + c * ld_dst + r, src + r * ld_src + c, sizeof(float));  // bits moved as they are
    }
  }
#else
  constexpr int64_t kStrip = 1024;  // int-sized pieces for at::vec's (M, N) arguments
  for (int64_t r0 = 0; r0 < rows; r0 += kStrip) {
    for (int64_t c0 = 0; c0 < cols; c0 += kStrip) {
      at::vec::transpose_mxn<float>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst,
                                    static_cast<int>(std::min(kStrip, rows - r0)),
                                    static_cast<int>(std::min(kStrip, cols - c0)));
    }
  }
#endif
}

Transpose transpose() { return &transpose_impl; }

uint64_t fingerprint(const void* data, int64_t bytes) {
  // 64 independent 32-bit FNV-1a style lanes over the 4-byte words (enough lanes in flight to run
  // at memory speed), then the tail bytes and the length, folded into 64 bits with a final mix.
  constexpr int64_t kLanes = 64;
  constexpr uint32_t kPrime = 16777619u;
  uint32_t lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    lanes[l] = 2166136261u ^ static_cast<uint32_t>(l * 0x9E3779B9u);
  }
  const auto* bytes_p = static_cast<const unsigned char*>(data);
  const int64_t words = bytes / 4;
  const int64_t full = words - words % kLanes;
  for (int64_t w = 0; w < full; w += kLanes) {
    uint32_t chunk[kLanes];
    std::memcpy(chunk, bytes_p + 4 * w, sizeof(chunk));
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] = (lanes[l] ^ chunk[l]) * kPrime;
    }
  }
  uint64_t hash = 0x243F6A8885A308D3ull ^ static_cast<uint64_t>(bytes);
  auto mix = [&hash](uint64_t value) {
    hash ^= value + 0x9E3779B97F4A7C15ull + (hash << 6) + (hash >> 2);
    hash *= 0xBF58476D1CE4E5B9ull;
    hash ^= hash >> 31;
  };
  for (int64_t l = 0; l < kLanes; ++l) {
    mix(lanes[l]);
  }
  for (int64_t b = 4 * full; b < bytes; ++b) {
    mix(bytes_p[b] | (static_cast<uint64_t>(b) << 8));
  }
  return hash;
}

#define FASTMLSTM_INSTANTIATE(D, E) template const StepKernels<D, E>& step_kernels<D, E>();
FASTMLSTM_INSTANTIATE(float, float)
FASTMLSTM_INSTANTIATE(c10::BFloat16, float)
FASTMLSTM_INSTANTIATE(c10::BFloat16, c10::BFloat16)
FASTMLSTM_INSTANTIATE(c10::Half, float)
#undef FASTMLSTM_INSTANTIATE
template RecomputeM<float> recompute_m<float>();
template RecomputeM<c10::BFloat16> recompute_m<c10::BFloat16>();
template RecomputeM<c10::Half> recompute_m<c10::Half>();
template Widen<float> widen<float>();
template Widen<c10::BFloat16> widen<c10::BFloat16>();
template Widen<c10::Half> widen<c10::Half>();
template SmallGemm<c10::BFloat16> small_gemm<c10::BFloat16>();
template SmallGemm<c10::Half> small_gemm<c10::Half>();

}  // namespace FASTMLSTM_ISA
}  // namespace cpu
}  // namespace fastmlstm
