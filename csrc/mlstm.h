// The fused pointwise kernels of the multiplicative LSTM step, as seen from the host driver.
//
// Legend (as in fastmlstm/ops/interface.py)
//   T time steps    B batch rows    H hidden units    G = 4 gates, order i, f, o, u
//   dtype: the activation dtype (float32, float16 or bfloat16); f32: always float32
//
// Layouts (row-major, contiguous unless a row stride is named):
//   proj_t  [B, 5H] dtype  x Wx + b for the gates, then xm = x Wmx
//   act_t   [B, 6H] dtype  saved gates i, f, o, u, then xm, then hm = h Wmh^T
//   dproj_t [B, 5H] dtype  dz (4H), then dxm
//   h, m, dhm [B, H] dtype          c, dh, dc, hm, dm, rec [B, H] f32       z [B, 4H] f32
//   lengths [B] int64 on the device, or undefined (every row runs all T steps)
//
// The driver (mlstm.cpp) runs the GEMMs with cuBLAS through ATen; every function here launches one
// kernel on the current CUDA stream of the current device. An undefined at::Tensor means "absent".
// The math of each kernel is in mlstm_pointwise.h.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

namespace fastmlstm {
namespace kernels {

// The device type these kernels run on: CUDA (mlstm_kernels.cu). The tests link the same driver
// against host loops over the same pointwise functions (tests/csrc_host/), which answer CPU.
at::DeviceType device_type();

// hm = h_{t-1} Wmh^T (f32, from the GEMM) -> m = xm * hm (dtype); with act_t, saves xm and hm.
void forward_m(const at::Tensor& hm, const at::Tensor& proj_t, const at::Tensor& m, const at::Tensor& act_t);

// z = m Wh^T (f32, from the GEMM) + the gate columns of proj_t -> gates, c_t, h_t.
// h holds h_{t-1} and c holds c_{t-1} on entry; both are overwritten with step t's state. The new h
// also goes to output_t, the new c to cell_t (if defined); act_t (if defined) receives the gates.
// Rows with t >= lengths[b] keep h and c unchanged.
void forward_cell(const at::Tensor& z, const at::Tensor& proj_t, const at::Tensor& h, const at::Tensor& c,
                  const at::Tensor& output_t, const at::Tensor& cell_t, const at::Tensor& act_t,
                  const at::Tensor& lengths, int64_t t);

// The cell derivatives of step t. On entry dh holds the full gradient that reached h_{t+1} and dc
// the gradient of c_t carried from step t+1; rec (if defined) is dhm_{t+1} Wmh. On exit dh holds
// the gradient of h_t, dc that of c_{t-1}, and the first 4H columns of dproj_t hold dz_t.
void backward_cell(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& dc,
                   const at::Tensor& grad_output_t, const at::Tensor& grad_cell_t, const at::Tensor& act_t,
                   const at::Tensor& cell_t, const at::Tensor& cell_prev, const at::Tensor& dproj_t,
                   const at::Tensor& lengths, int64_t t);

// dm = dz_t Wh (f32, from the GEMM) -> dxm = dm * hm (last H columns of dproj_t), dhm = dm * xm.
void backward_m(const at::Tensor& dm, const at::Tensor& act_t, const at::Tensor& dproj_t,
                const at::Tensor& grad_hm_t);

// out = rec + dh for rows that were padding at step t_next (t_next >= lengths[b]), rec elsewhere:
// the gradient of the state entering step t_next.
void carry_hidden_gradient(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& out,
                           const at::Tensor& lengths, int64_t t_next);

// m = xm * hm for every saved step: act [T, B, 6H] -> m [T*B, H] (dtype), for the weight gradients.
void recompute_m(const at::Tensor& act, const at::Tensor& m);

}  // namespace kernels
}  // namespace fastmlstm
