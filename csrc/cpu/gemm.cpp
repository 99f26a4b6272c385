// The float32 GEMMs beside the time loops of the CPU backend, as oneDNN's micro-kernels
// (at::native::cpublas::brgemm): the backward's sums over a chunk of steps (the weight gradients,
// dW += A^T B, A^T transposed slice by slice into the thread's buffer) and x's gradient where
// weight_grad_tiles() says so (driver.h), and the forward's xm always (rows_gemm: row by row).
// Their shapes are skinny (N is the input features) or transposed, where MKL ran well below its
// rate on square products (bench/kernels/NOTES-cpu-kernels.md, "The GEMMs beside the loops").
// Legend: driver.h.

#include "driver.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>

namespace fastmlstm {
namespace cpu {
namespace {

// Rows of A^T (columns of A) transposed at a time into a thread's buffer, right before their tiles.
constexpr int64_t kGradSlice = 128;
// Rows of A per tile of rows_gemm (its column blocks are kWideColumns wide).
constexpr int64_t kRowsTile = 32;

// out[i * ld_out] += the sum of row i of a [rows, R] (dense), for the bias's gradient: 16 partial
// sums per row, lane by lane (a loop the compiler vectorizes without reassociating).
void add_row_sums(int64_t rows, int64_t R, const float* a, float* out, int64_t ld_out) {
  constexpr int64_t kLanes = 16;
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = a + i * R;
    float lanes[kLanes] = {};
    int64_t r = 0;
    for (; r + kLanes <= R; r += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        lanes[l] += row[r + l];
      }
    }
    float sum = 0.0f;
    for (; r < R; ++r) {
      sum += row[r];
    }
    for (const float lane : lanes) {
      sum += lane;
    }
    out[i * ld_out] += sum;
  }
}

// C [rows, width] (+)= A [rows, K] B [K, width] with K in the tile GEMMs' pieces (k_piece).
void brgemm_pieces(int64_t rows, int64_t width, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc, bool add) {
  const int64_t piece = k_piece(K, sizeof(float));
  for (int64_t k0 = 0; k0 < K; k0 += piece) {
    at::native::cpublas::brgemm(rows, width, std::min(piece, K - k0), lda, ldb, ldc, add || k0 > 0, A + k0,
                                B + k0 * ldb, C, false);
  }
}

// The slices of A's columns [first, last) (A [R, N], row stride lda): each transposed into the
// thread's buffer, then multiplied by the packed blocks of m (the columns below n_main, into dW
// [n_main, H]) and by the input rows of `in` (all columns). The slices spread over the threads.
void slice_products(const float* A, int64_t R, int64_t lda, int64_t first, int64_t last, int64_t n_main,
                    const float* packed, int64_t blocks, int64_t H, float* dw, const InputSums* in) {
  const Transpose transpose = transpose_kernel();
  at::parallel_for(0, ceil_div(last - first, kGradSlice), 1, [&](int64_t s0, int64_t s1) {
    std::vector<float> a(kGradSlice * R);  // rows [n0, n0 + rows) of A^T, [rows, R]
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t n0 = first + s * kGradSlice, rows = std::min(kGradSlice, last - n0);
      const int64_t main_rows = std::clamp<int64_t>(n_main - n0, 0, rows);
      transpose(R, rows, A + n0, lda, a.data(), R);
      for (int64_t j = 0; j < blocks && main_rows > 0; ++j) {
        const int64_t width = std::min(kWideColumns, H - j * kWideColumns);
        brgemm_pieces(main_rows, width, R, a.data(), R, packed + j * R * kWideColumns, kWideColumns,
                      dw + n0 * H + j * kWideColumns, H, true);
      }
      if (in != nullptr) {
        for (int64_t c0 = 0; c0 < in->cols; c0 += kWideColumns) {
          brgemm_pieces(rows, std::min(kWideColumns, in->cols - c0), R, a.data(), R, in->x + c0, in->ld_x,
                        in->out + n0 * in->ld_out + c0, in->ld_out, true);
        }
        add_row_sums(rows, R, a.data(), in->out + n0 * in->ld_out + in->cols, in->ld_out);
      }
    }
  });
}

}  // namespace

void gradient_tiles(const Tensor& A, int64_t n_main, const Tensor& dW, const Tensor& m, const InputSums* in) {
  const int64_t R = A.size(0), N = A.size(1);
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.stride(1) == 1 && n_main >= 0 && n_main <= N &&
                  (n_main == 0 || (dW.is_contiguous() && m.size(0) == R && dW.size(0) == n_main)),
              kWho, "gradient_tiles: operands of the wrong shape or layout");
  if (R == 0) {
    return;
  }
  Tensor packed;
  int64_t blocks = 0, H = 0;
  if (n_main > 0) {
    packed = pack_weight(m.contiguous(), false, kFloat32, std::nullopt, true, kWideColumns);
    blocks = packed.size(0);
    H = m.size(1);
  }
  const float* a = A.data_ptr<float>();
  const float* p = n_main > 0 ? packed.data_ptr<float>() : nullptr;
  float* dw = n_main > 0 ? dW.data_ptr<float>() : nullptr;
  // Two passes, so that the columns with both products and those with the input's alone each
  // spread evenly over the threads.
  slice_products(a, R, A.stride(0), 0, n_main, n_main, p, blocks, H, dw, in);
  if (in != nullptr && n_main < N) {
    slice_products(a, R, A.stride(0), n_main, N, n_main, nullptr, 0, 0, nullptr, in);
  }
}

void weight_gradient(const Tensor& dW, const Tensor& dz, const Tensor& m) {
  if (weight_grad_tiles()) {
    gradient_tiles(dz, dz.size(1), dW, m, nullptr);
  } else {
    dW.addmm_(dz.t(), m);
  }
}

void rows_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc) {
  TORCH_CHECK(K > 0, kWho, "rows_gemm: K must be positive (the callers' x has I > 0 features)");
  const int64_t tiles = ceil_div(M, kRowsTile), blocks = ceil_div(N, kWideColumns);
  at::parallel_for(0, tiles * blocks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = (i / blocks) * kRowsTile, n0 = (i % blocks) * kWideColumns;
      brgemm_pieces(std::min(kRowsTile, M - m0), std::min(kWideColumns, N - n0), K, A + m0 * lda, lda, B + n0, ldb,
                    C + m0 * ldc + n0, ldc, false);
    }
  });
}

}  // namespace cpu
}  // namespace fastmlstm
