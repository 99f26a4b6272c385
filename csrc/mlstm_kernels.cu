// Fused pointwise CUDA kernels of the multiplicative LSTM, forward and backward (see mlstm.h), and
// their launchers: grid-stride loops over the element functions of mlstm_pointwise.h.
//
// Legend: T time, B batch rows, H hidden units, G = 4 gates (i, f, o, u); idx = b * H + n runs over
// one step's [B, H] elements, b the batch row and n the hidden unit. One thread owns one (b, n) and
// all four gates of it, so every pointwise value of a unit is computed in registers, once, and each
// step's pointwise work is one launch after each of its two GEMMs.

#include "mlstm.h"
#include "mlstm_pointwise.h"

#include <algorithm>
#include <cstdint>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastmlstm {
namespace kernels {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill any GPU, never more than the grid limit.
constexpr int64_t kMaxBlocks = 65535;

// float32, float16 and bfloat16 only: float64 is not part of the contract.
#define FASTMLSTM_DISPATCH(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

#define FASTMLSTM_GRID_STRIDE_LOOP(idx, n)                                           \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       idx < (n); idx += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename scalar_t>
__global__ void forward_m_kernel(const float* __restrict__ hm, const scalar_t* __restrict__ proj,
                                 scalar_t* __restrict__ m, scalar_t* __restrict__ act, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) { pointwise::forward_m(idx, H, hm, proj, m, act); }
}

template <typename scalar_t>
__global__ void forward_cell_kernel(const float* __restrict__ z, const scalar_t* __restrict__ proj,
                                    scalar_t* __restrict__ h, float* __restrict__ c, scalar_t* __restrict__ out,
                                    float* __restrict__ cell, scalar_t* __restrict__ act,
                                    const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) { pointwise::forward_cell(idx, H, z, proj, h, c, out, cell, act, lengths, t); }
}

template <typename scalar_t>
__global__ void backward_cell_kernel(const float* __restrict__ rec, float* __restrict__ dh, float* __restrict__ dc,
                                     const scalar_t* __restrict__ dout, const float* __restrict__ dcells,
                                     const scalar_t* __restrict__ act, const float* __restrict__ c,
                                     const float* __restrict__ c_prev, scalar_t* __restrict__ dproj,
                                     const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    pointwise::backward_cell(idx, H, rec, dh, dc, dout, dcells, act, c, c_prev, dproj, lengths, t);
  }
}

template <typename scalar_t>
__global__ void backward_m_kernel(const float* __restrict__ dm, const scalar_t* __restrict__ act,
                                  scalar_t* __restrict__ dproj, scalar_t* __restrict__ dhm, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) { pointwise::backward_m(idx, H, dm, act, dproj, dhm); }
}

__global__ void carry_hidden_gradient_kernel(const float* __restrict__ rec, const float* __restrict__ dh,
                                             float* __restrict__ out, const int64_t* __restrict__ lengths,
                                             int64_t t_next, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) { pointwise::carry_hidden_gradient(idx, H, rec, dh, out, lengths, t_next); }
}

template <typename scalar_t>
__global__ void recompute_m_kernel(const scalar_t* __restrict__ act, scalar_t* __restrict__ m, int64_t rows,
                                   int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, rows * H) { pointwise::recompute_m(idx, H, act, m); }
}

unsigned int blocks_for(int64_t elements) {
  return static_cast<unsigned int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename T>
T* ptr_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

}  // namespace

at::DeviceType device_type() { return at::kCUDA; }

void forward_m(const at::Tensor& hm, const at::Tensor& proj_t, const at::Tensor& m, const at::Tensor& act_t) {
  const int64_t B = m.size(0), H = m.size(1);
  if (B * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMLSTM_DISPATCH(m.scalar_type(), "fastmlstm_forward_m", [&] {
    forward_m_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        hm.data_ptr<float>(), proj_t.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(act_t), B,
        H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void forward_cell(const at::Tensor& z, const at::Tensor& proj_t, const at::Tensor& h, const at::Tensor& c,
                  const at::Tensor& output_t, const at::Tensor& cell_t, const at::Tensor& act_t,
                  const at::Tensor& lengths, int64_t t) {
  const int64_t B = h.size(0), H = h.size(1);
  if (B * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMLSTM_DISPATCH(h.scalar_type(), "fastmlstm_forward_cell", [&] {
    forward_cell_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        z.data_ptr<float>(), proj_t.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), c.data_ptr<float>(),
        output_t.data_ptr<scalar_t>(), ptr_or_null<float>(cell_t), ptr_or_null<scalar_t>(act_t),
        ptr_or_null<int64_t>(lengths), t, B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_cell(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& dc,
                   const at::Tensor& grad_output_t, const at::Tensor& grad_cell_t, const at::Tensor& act_t,
                   const at::Tensor& cell_t, const at::Tensor& cell_prev, const at::Tensor& dproj_t,
                   const at::Tensor& lengths, int64_t t) {
  const int64_t B = dh.size(0), H = dh.size(1);
  if (B * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMLSTM_DISPATCH(act_t.scalar_type(), "fastmlstm_backward_cell", [&] {
    backward_cell_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        ptr_or_null<float>(rec), dh.data_ptr<float>(), dc.data_ptr<float>(), ptr_or_null<scalar_t>(grad_output_t),
        ptr_or_null<float>(grad_cell_t), act_t.data_ptr<scalar_t>(), cell_t.data_ptr<float>(),
        cell_prev.data_ptr<float>(), dproj_t.data_ptr<scalar_t>(), ptr_or_null<int64_t>(lengths), t, B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_m(const at::Tensor& dm, const at::Tensor& act_t, const at::Tensor& dproj_t,
                const at::Tensor& grad_hm_t) {
  const int64_t B = dm.size(0), H = dm.size(1);
  if (B * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMLSTM_DISPATCH(act_t.scalar_type(), "fastmlstm_backward_m", [&] {
    backward_m_kernel<scalar_t><<<blocks_for(B * H), kThreads, 0, stream>>>(
        dm.data_ptr<float>(), act_t.data_ptr<scalar_t>(), dproj_t.data_ptr<scalar_t>(),
        grad_hm_t.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void carry_hidden_gradient(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& out,
                           const at::Tensor& lengths, int64_t t_next) {
  const int64_t B = out.size(0), H = out.size(1);
  if (B * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  carry_hidden_gradient_kernel<<<blocks_for(B * H), kThreads, 0, stream>>>(
      rec.data_ptr<float>(), dh.data_ptr<float>(), out.data_ptr<float>(), lengths.data_ptr<int64_t>(), t_next, B, H);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void recompute_m(const at::Tensor& act, const at::Tensor& m) {
  const int64_t rows = m.size(0), H = m.size(1);
  if (rows * H == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTMLSTM_DISPATCH(act.scalar_type(), "fastmlstm_recompute_m", [&] {
    recompute_m_kernel<scalar_t><<<blocks_for(rows * H), kThreads, 0, stream>>>(
        act.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), rows, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace kernels
}  // namespace fastmlstm
