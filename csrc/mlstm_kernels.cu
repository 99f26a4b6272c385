// Fused pointwise CUDA kernels of the multiplicative LSTM, forward and backward (see mlstm.h).
//
// Legend: T time, B batch rows, H hidden units, G = 4 gates (i, f, o, u); idx = b * H + n runs over
// one step's [B, H] elements, b the batch row and n the hidden unit. One thread owns one (b, n) and
// all four gates of it, so every pointwise value of a unit is computed in registers, once.
//
// Numerics (the contract of fastmlstm/ops/common.py): loads widen to float32, all arithmetic is
// float32, stores round to the activation dtype (round to nearest even); c, dh and dc stay float32.
// The formulas and their evaluation order follow fastmlstm/ops/reference.py.

#include "mlstm.h"

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

// exp(-x) overflows to inf for very negative x, giving 1 / inf = 0: no NaN either way. The same
// expression as torch.sigmoid's CUDA kernel; tanhf saturates cleanly to +-1.
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename scalar_t>
__device__ __forceinline__ float widen(scalar_t x) {
  return static_cast<float>(x);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t narrow(float x) {
  return static_cast<scalar_t>(x);
}

template <typename scalar_t>
__global__ void forward_m_kernel(const float* __restrict__ hm, const scalar_t* __restrict__ proj,
                                 scalar_t* __restrict__ m, scalar_t* __restrict__ act, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    const int64_t b = idx / H;
    const int64_t n = idx - b * H;
    const scalar_t xm = proj[b * 5 * H + 4 * H + n];
    const float hm_v = hm[idx];
    m[idx] = narrow<scalar_t>(widen(xm) * hm_v);
    if (act != nullptr) {
      scalar_t* a = act + b * 6 * H + n;
      a[4 * H] = xm;
      a[5 * H] = narrow<scalar_t>(hm_v);
    }
  }
}

template <typename scalar_t>
__global__ void forward_cell_kernel(const float* __restrict__ z, const scalar_t* __restrict__ proj,
                                    scalar_t* __restrict__ h, float* __restrict__ c, scalar_t* __restrict__ out,
                                    float* __restrict__ cell, scalar_t* __restrict__ act,
                                    const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    const int64_t b = idx / H;
    const int64_t n = idx - b * H;
    const float* zb = z + b * 4 * H + n;
    const scalar_t* x = proj + b * 5 * H + n;
    const float i = sigmoid(zb[0] + widen(x[0]));
    const float f = sigmoid(zb[H] + widen(x[H]));
    const float o = sigmoid(zb[2 * H] + widen(x[2 * H]));
    const float u = tanhf(zb[3 * H] + widen(x[3 * H]));
    const float c_prev = c[idx];
    float c_new = f * c_prev + i * u;
    scalar_t h_new = narrow<scalar_t>(o * tanhf(c_new));
    if (lengths != nullptr && t >= lengths[b]) {
      // Past its length a row keeps its state: h and c are carried through unchanged.
      c_new = c_prev;
      h_new = h[idx];
    }
    c[idx] = c_new;
    h[idx] = h_new;
    out[idx] = h_new;
    if (cell != nullptr) {
      cell[idx] = c_new;
    }
    if (act != nullptr) {
      scalar_t* a = act + b * 6 * H + n;
      a[0] = narrow<scalar_t>(i);
      a[H] = narrow<scalar_t>(f);
      a[2 * H] = narrow<scalar_t>(o);
      a[3 * H] = narrow<scalar_t>(u);
    }
  }
}

template <typename scalar_t>
__global__ void backward_cell_kernel(const float* __restrict__ rec, float* __restrict__ dh, float* __restrict__ dc,
                                     const scalar_t* __restrict__ dout, const float* __restrict__ dcells,
                                     const scalar_t* __restrict__ act, const float* __restrict__ c,
                                     const float* __restrict__ c_prev, scalar_t* __restrict__ dproj,
                                     const int64_t* __restrict__ lengths, int64_t t, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    const int64_t b = idx / H;
    const int64_t n = idx - b * H;
    const bool has_len = lengths != nullptr;
    const int64_t len = has_len ? lengths[b] : 0;
    float dh_v = dh[idx];
    if (rec != nullptr) {
      // dh reaches h_t through hm_{t+1}; a row that was padding at t+1 passed h_t through
      // unchanged, so the gradient that reached h_{t+1} passes straight back as well.
      dh_v = (has_len && t + 1 >= len) ? rec[idx] + dh_v : rec[idx];
    }
    if (dout != nullptr) {
      dh_v += widen(dout[idx]);
    }
    dh[idx] = dh_v;

    float dc_v = dc[idx];
    if (dcells != nullptr) {
      dc_v += dcells[idx];
    }
    const scalar_t* a = act + b * 6 * H + n;
    const float i = widen(a[0]);
    const float f = widen(a[H]);
    const float o = widen(a[2 * H]);
    const float u = widen(a[3 * H]);
    const float c_v = c[idx];
    const float c_prev_v = c_prev[idx];
    const float tanh_c = tanhf(c_v);
    const bool active = !has_len || t < len;

    float dzi = 0.0f, dzf = 0.0f, dzo = 0.0f, dzu = 0.0f;
    if (active) {
      dc_v += dh_v * o * (1.0f - tanh_c * tanh_c);
      dzi = dc_v * u * i * (1.0f - i);
      dzf = dc_v * c_prev_v * f * (1.0f - f);
      dzo = dh_v * tanh_c * o * (1.0f - o);
      dzu = dc_v * i * (1.0f - u * u);
      dc[idx] = dc_v * f;
    } else {
      // A padded step is the identity on c: its gradient passes through, its gates get none.
      dc[idx] = dc_v;
    }
    scalar_t* dz = dproj + b * 5 * H + n;
    dz[0] = narrow<scalar_t>(dzi);
    dz[H] = narrow<scalar_t>(dzf);
    dz[2 * H] = narrow<scalar_t>(dzo);
    dz[3 * H] = narrow<scalar_t>(dzu);
  }
}

template <typename scalar_t>
__global__ void backward_m_kernel(const float* __restrict__ dm, const scalar_t* __restrict__ act,
                                  scalar_t* __restrict__ dproj, scalar_t* __restrict__ dhm, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    const int64_t b = idx / H;
    const int64_t n = idx - b * H;
    const scalar_t* a = act + b * 6 * H + n;
    const float dm_v = dm[idx];
    dproj[b * 5 * H + 4 * H + n] = narrow<scalar_t>(dm_v * widen(a[5 * H]));
    dhm[idx] = narrow<scalar_t>(dm_v * widen(a[4 * H]));
  }
}

__global__ void carry_hidden_gradient_kernel(const float* __restrict__ rec, const float* __restrict__ dh,
                                             float* __restrict__ out, const int64_t* __restrict__ lengths,
                                             int64_t t_next, int64_t B, int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, B * H) {
    const int64_t b = idx / H;
    out[idx] = t_next >= lengths[b] ? rec[idx] + dh[idx] : rec[idx];
  }
}

template <typename scalar_t>
__global__ void recompute_m_kernel(const scalar_t* __restrict__ act, scalar_t* __restrict__ m, int64_t rows,
                                   int64_t H) {
  FASTMLSTM_GRID_STRIDE_LOOP(idx, rows * H) {
    const int64_t r = idx / H;
    const int64_t n = idx - r * H;
    const scalar_t* a = act + r * 6 * H + n;
    m[idx] = narrow<scalar_t>(widen(a[4 * H]) * widen(a[5 * H]));
  }
}

unsigned int blocks_for(int64_t elements) {
  return static_cast<unsigned int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename T>
T* ptr_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

}  // namespace

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
