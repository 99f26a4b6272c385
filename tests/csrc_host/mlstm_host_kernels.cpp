// Test-only: the launchers of csrc/mlstm.h as host loops over the same element functions the CUDA
// kernels run (csrc/mlstm_pointwise.h). Linked with the real driver (csrc/mlstm.cpp), it lets the
// tests run the CUDA backend's host code and pointwise math on CPU tensors, without a GPU.
// Legend and layouts: csrc/mlstm.h.

#include "mlstm.h"
#include "mlstm_pointwise.h"

#include <cstdint>

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastmlstm {
namespace kernels {
namespace {

#define FASTMLSTM_DISPATCH(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

template <typename T>
T* ptr_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

}  // namespace

at::DeviceType device_type() { return at::kCPU; }

void forward_m(const at::Tensor& hm, const at::Tensor& proj_t, const at::Tensor& m, const at::Tensor& act_t) {
  const int64_t B = m.size(0), H = m.size(1);
  FASTMLSTM_DISPATCH(m.scalar_type(), "forward_m", [&] {
    for (int64_t idx = 0; idx < B * H; ++idx) {
      pointwise::forward_m(idx, H, hm.data_ptr<float>(), proj_t.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                           ptr_or_null<scalar_t>(act_t));
    }
  });
}

void forward_cell(const at::Tensor& z, const at::Tensor& proj_t, const at::Tensor& h, const at::Tensor& c,
                  const at::Tensor& output_t, const at::Tensor& cell_t, const at::Tensor& act_t,
                  const at::Tensor& lengths, int64_t t) {
  const int64_t B = h.size(0), H = h.size(1);
  FASTMLSTM_DISPATCH(h.scalar_type(), "forward_cell", [&] {
    for (int64_t idx = 0; idx < B * H; ++idx) {
      pointwise::forward_cell(idx, H, z.data_ptr<float>(), proj_t.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                              c.data_ptr<float>(), output_t.data_ptr<scalar_t>(), ptr_or_null<float>(cell_t),
                              ptr_or_null<scalar_t>(act_t), ptr_or_null<int64_t>(lengths), t);
    }
  });
}

void backward_cell(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& dc,
                   const at::Tensor& grad_output_t, const at::Tensor& grad_cell_t, const at::Tensor& act_t,
                   const at::Tensor& cell_t, const at::Tensor& cell_prev, const at::Tensor& dproj_t,
                   const at::Tensor& lengths, int64_t t) {
  const int64_t B = dh.size(0), H = dh.size(1);
  FASTMLSTM_DISPATCH(act_t.scalar_type(), "backward_cell", [&] {
    for (int64_t idx = 0; idx < B * H; ++idx) {
      pointwise::backward_cell(idx, H, ptr_or_null<float>(rec), dh.data_ptr<float>(), dc.data_ptr<float>(),
                               ptr_or_null<scalar_t>(grad_output_t), ptr_or_null<float>(grad_cell_t),
                               act_t.data_ptr<scalar_t>(), cell_t.data_ptr<float>(), cell_prev.data_ptr<float>(),
                               dproj_t.data_ptr<scalar_t>(), ptr_or_null<int64_t>(lengths), t);
    }
  });
}

void backward_m(const at::Tensor& dm, const at::Tensor& act_t, const at::Tensor& dproj_t,
                const at::Tensor& grad_hm_t) {
  const int64_t B = dm.size(0), H = dm.size(1);
  FASTMLSTM_DISPATCH(act_t.scalar_type(), "backward_m", [&] {
    for (int64_t idx = 0; idx < B * H; ++idx) {
      pointwise::backward_m(idx, H, dm.data_ptr<float>(), act_t.data_ptr<scalar_t>(), dproj_t.data_ptr<scalar_t>(),
                            grad_hm_t.data_ptr<scalar_t>());
    }
  });
}

void carry_hidden_gradient(const at::Tensor& rec, const at::Tensor& dh, const at::Tensor& out,
                           const at::Tensor& lengths, int64_t t_next) {
  const int64_t B = out.size(0), H = out.size(1);
  for (int64_t idx = 0; idx < B * H; ++idx) {
    pointwise::carry_hidden_gradient(idx, H, rec.data_ptr<float>(), dh.data_ptr<float>(), out.data_ptr<float>(),
                                     lengths.data_ptr<int64_t>(), t_next);
  }
}

void recompute_m(const at::Tensor& act, const at::Tensor& m) {
  const int64_t rows = m.size(0), H = m.size(1);
  FASTMLSTM_DISPATCH(act.scalar_type(), "recompute_m", [&] {
    for (int64_t idx = 0; idx < rows * H; ++idx) {
      pointwise::recompute_m(idx, H, act.data_ptr<scalar_t>(), m.data_ptr<scalar_t>());
    }
  });
}

}  // namespace kernels
}  // namespace fastmlstm
