// Host driver of the CUDA backend: input checks, the time loops, the GEMMs, and the operator
// registration (torch.ops.fastmlstm_cuda.forward / backward).
//
// Legend: T time, B batch rows, H hidden units, G = 4 gates (i, f, o, u); dtype is the activation
// dtype (float32, float16 or bfloat16), f32 is float32. The contract, shapes and numerics are those of
// fastmlstm/ops/interface.py; the order of operations follows fastmlstm/ops/reference/recurrence.py.
//
// Per forward step (two GEMMs that depend on each other, each followed by one fused kernel):
//   hm = h_{t-1} Wmh^T    (cuBLAS, f32 out)   ->  forward_m:    m = xm * hm, save xm, hm
//   z  = m Wh^T           (cuBLAS, f32 out)   ->  forward_cell: gates, c_t, h_t, lengths mask
// Per backward step, mirrored:
//   rec = dhm_{t+1} Wmh   (cuBLAS, f32 out)   ->  backward_cell: dh_t, dz_t, dc_{t-1}
//   dm  = dz_t Wh         (cuBLAS, f32 out)   ->  backward_m:    dxm_t, dhm_t
// and after the loop the weight gradients as two large GEMMs over all T*B rows.
//
// The GEMMs go through ATen (at::mm_out), which calls cuBLAS/cuBLASLt with the current stream and
// the current cuBLAS handle. 16-bit operands multiply with float32 accumulation and a float32
// result (mm's out_dtype overload), so hm, z, rec and dm are never rounded to 16 bits: the same
// numbers the reference gets from float32 products of the upcast operands. Nothing here reads a
// value back to the host, so forward and backward never synchronize with the device.

#include "mlstm.h"

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace fastmlstm {
namespace {

using at::Tensor;
constexpr int64_t kGates = 4;

bool is_activation_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Device, dtype, shape and layout of one input, with a message that names it.
void check_input(const Tensor& tensor, const char* name, const at::Device& device, at::ScalarType dtype,
                 at::IntArrayRef shape) {
  TORCH_CHECK(tensor.defined(), "fastmlstm cuda backend: ", name, " is missing");
  TORCH_CHECK(tensor.device() == device, "fastmlstm cuda backend: ", name, " is on ", tensor.device(),
              " but the recurrence runs on ", device, "; every tensor must be on that device");
  TORCH_CHECK(tensor.scalar_type() == dtype, "fastmlstm cuda backend: ", name, " must have dtype ", dtype,
              ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == shape, "fastmlstm cuda backend: ", name, " must have shape ", shape, ", got ",
              tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), "fastmlstm cuda backend: ", name,
              " must be contiguous (call .contiguous() first); got strides ", tensor.strides());
}

void check_optional(const std::optional<Tensor>& tensor, const char* name, const at::Device& device,
                    at::ScalarType dtype, at::IntArrayRef shape) {
  if (tensor.has_value() && tensor->defined()) {
    check_input(*tensor, name, device, dtype, shape);
  }
}

Tensor value_or_undefined(const std::optional<Tensor>& tensor) {
  return tensor.has_value() ? *tensor : Tensor();
}

// A buffer the kernels overwrite completely. Tests ask for NaN-filled buffers so that an element a
// kernel forgets to write fails the comparison instead of passing by luck.
Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  if (poison) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(shape, options);
}

// out (f32) = a @ b with float32 accumulation, for dtype operands.
class Float32Gemm {
 public:
  Float32Gemm(at::ScalarType dtype, const at::Device& device)
      // The operands are upcast where ATen has no 16-bit x 16-bit -> float32 GEMM: with fp16
      // accumulation switched on (torch.backends.cuda.matmul.allow_fp16_accumulation) it refuses
      // fp16 -> fp32, and on the CPU (the tests' host build) there is none.
      : upcast_(dtype != at::kFloat &&
                (!device.is_cuda() || (dtype == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS()))),
        same_dtype_(dtype == at::kFloat) {}

  // Weights are prepared once per call, not once per step.
  Tensor prepare_weight(const Tensor& weight) const { return upcast_ ? weight.to(at::kFloat) : weight; }

  void operator()(Tensor& out, const Tensor& a, const Tensor& b) const {
    if (same_dtype_) {
      at::mm_out(out, a, b);
    } else if (upcast_) {
      at::mm_out(out, a.to(at::kFloat), b);
    } else {
      at::mm_out(out, a, b, at::kFloat);
    }
  }

 private:
  bool upcast_;
  bool same_dtype_;
};

struct Sizes {
  int64_t T, B, H;
};

Sizes check_proj(const Tensor& proj) {
  TORCH_CHECK(proj.defined(), "fastmlstm cuda backend: proj is missing");
  TORCH_CHECK(proj.device().type() == kernels::device_type(), "fastmlstm cuda backend: proj must be a ",
              kernels::device_type(), " tensor, got one on ", proj.device(),
              " (the 'cuda' backend runs on CUDA tensors only; use backend='reference' on the CPU)");
  TORCH_CHECK(is_activation_dtype(proj.scalar_type()),
              "fastmlstm cuda backend: proj must be float32, float16 or bfloat16, got ", proj.scalar_type());
  TORCH_CHECK(proj.dim() == 3, "fastmlstm cuda backend: proj must be 3-D [T, B, 5H], got shape ", proj.sizes());
  TORCH_CHECK(proj.size(2) > 0 && proj.size(2) % 5 == 0,
              "fastmlstm cuda backend: proj's last dimension must be 5 * hidden_size, got ", proj.size(2));
  TORCH_CHECK(proj.is_contiguous(),
              "fastmlstm cuda backend: proj must be contiguous (call .contiguous() first); got strides ",
              proj.strides());
  return {proj.size(0), proj.size(1), proj.size(2) / 5};
}

void check_lengths(const std::optional<Tensor>& lengths, const at::Device& device, int64_t B) {
  // Values are not range-checked here: that would read them back to the host. The Python layer
  // (fastmlstm.functional) checks them on the CPU before moving them to the device.
  check_optional(lengths, "lengths", device, at::kLong, {B});
}

Tensor defined_lengths(const std::optional<Tensor>& lengths) {
  return lengths.has_value() && lengths->defined() ? *lengths : Tensor();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& proj, const Tensor& weight_hh,
                                                   const Tensor& weight_hm, const Tensor& h0, const Tensor& c0,
                                                   const std::optional<Tensor>& lengths, bool save_for_backward,
                                                   bool return_cell_states, bool poison_buffers) {
  const auto [T, B, H] = check_proj(proj);
  const at::Device device = proj.device();
  const at::ScalarType dtype = proj.scalar_type();
  check_input(weight_hh, "weight_hh", device, dtype, {kGates * H, H});
  check_input(weight_hm, "weight_hm", device, dtype, {H, H});
  check_input(h0, "h0", device, at::kFloat, {B, H});
  check_input(c0, "c0", device, at::kFloat, {B, H});
  check_lengths(lengths, device, B);
  const at::DeviceGuard device_guard(device);

  const auto options = proj.options();
  const auto f32 = options.dtype(at::kFloat);
  const bool keep_cells = save_for_backward || return_cell_states;
  Tensor output = new_buffer({T, B, H}, options, poison_buffers);
  Tensor cell_states = keep_cells ? new_buffer({T, B, H}, f32, poison_buffers) : at::empty({0}, f32);
  Tensor act = save_for_backward ? new_buffer({T, B, 6 * H}, options, poison_buffers) : at::empty({0}, options);

  // The running state. h is a private buffer (the GEMM always reads the same well-aligned
  // pointer, whatever T is, so a chunked run repeats the one-shot run bit for bit); c ends as c_n.
  Tensor h = h0.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  Tensor c = c0.clone();
  Tensor hm = at::empty({B, H}, f32);
  Tensor m = at::empty({B, H}, options);
  Tensor z = at::empty({B, kGates * H}, f32);
  const Float32Gemm gemm(dtype, device);
  const Tensor w_hm_t = gemm.prepare_weight(weight_hm).t();
  const Tensor w_hh_t = gemm.prepare_weight(weight_hh).t();
  const Tensor len = defined_lengths(lengths);

  for (int64_t t = 0; t < T; ++t) {
    const Tensor proj_t = proj.select(0, t);
    const Tensor act_t = save_for_backward ? act.select(0, t) : Tensor();
    gemm(hm, h, w_hm_t);
    kernels::forward_m(hm, proj_t, m, act_t);
    gemm(z, m, w_hh_t);
    kernels::forward_cell(z, proj_t, h, c, output.select(0, t), keep_cells ? cell_states.select(0, t) : Tensor(),
                          act_t, len, t);
  }
  return {output, c, cell_states, act};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& weight_hh, const Tensor& weight_hm,
    const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output,
    const Tensor& cell_states, const Tensor& act, bool poison_buffers) {
  TORCH_CHECK(output.defined() && output.device().type() == kernels::device_type(),
              "fastmlstm cuda backend: output must be a ", kernels::device_type(), " tensor");
  TORCH_CHECK(output.dim() == 3, "fastmlstm cuda backend: output must be 3-D [T, B, H], got shape ", output.sizes());
  TORCH_CHECK(is_activation_dtype(output.scalar_type()),
              "fastmlstm cuda backend: output must be float32, float16 or bfloat16, got ", output.scalar_type());
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  const at::Device device = output.device();
  const at::ScalarType dtype = output.scalar_type();
  check_input(output, "output", device, dtype, {T, B, H});
  TORCH_CHECK(act.dim() == 3 && cell_states.dim() == 3,
              "fastmlstm cuda backend: act and cell_states must be the [T, B, 6H] and [T, B, H] tensors saved by "
              "forward(save_for_backward=True), got shapes ", act.sizes(), " and ", cell_states.sizes());
  check_input(act, "act", device, dtype, {T, B, 6 * H});
  check_input(cell_states, "cell_states", device, at::kFloat, {T, B, H});
  check_input(weight_hh, "weight_hh", device, dtype, {kGates * H, H});
  check_input(weight_hm, "weight_hm", device, dtype, {H, H});
  check_input(h0, "h0", device, at::kFloat, {B, H});
  check_input(c0, "c0", device, at::kFloat, {B, H});
  check_optional(grad_output, "grad_output", device, dtype, {T, B, H});
  check_optional(grad_c_n, "grad_c_n", device, at::kFloat, {B, H});
  check_optional(grad_cell_states, "grad_cell_states", device, at::kFloat, {T, B, H});
  check_lengths(lengths, device, B);
  const at::DeviceGuard device_guard(device);

  const auto options = output.options();
  const auto f32 = options.dtype(at::kFloat);
  Tensor grad_proj = new_buffer({T, B, 5 * H}, options, poison_buffers);
  Tensor grad_hm = new_buffer({T, B, H}, options, poison_buffers);
  // dh carries the full gradient that reached h_{t+1}; dc the one of c_t. dc ends as grad_c0.
  Tensor dh = at::zeros({B, H}, f32);
  const Tensor grad_c_n_ = value_or_undefined(grad_c_n);
  Tensor dc = grad_c_n_.defined() ? grad_c_n_.clone() : at::zeros({B, H}, f32);
  const Tensor grad_output_ = value_or_undefined(grad_output);
  const Tensor grad_cells_ = value_or_undefined(grad_cell_states);
  const Tensor len = defined_lengths(lengths);
  Tensor rec = at::empty({B, H}, f32);
  Tensor dm = at::empty({B, H}, f32);
  const Float32Gemm gemm(dtype, device);
  const Tensor w_hm = gemm.prepare_weight(weight_hm);
  const Tensor w_hh = gemm.prepare_weight(weight_hh);

  for (int64_t t = T - 1; t >= 0; --t) {
    const bool has_rec = t < T - 1;
    if (has_rec) {
      gemm(rec, grad_hm.select(0, t + 1), w_hm);
    }
    const Tensor act_t = act.select(0, t);
    const Tensor grad_proj_t = grad_proj.select(0, t);
    kernels::backward_cell(has_rec ? rec : Tensor(), dh, dc,
                           grad_output_.defined() ? grad_output_.select(0, t) : Tensor(),
                           grad_cells_.defined() ? grad_cells_.select(0, t) : Tensor(), act_t,
                           cell_states.select(0, t), t > 0 ? cell_states.select(0, t - 1) : c0, grad_proj_t, len, t);
    gemm(dm, grad_proj_t.narrow(1, 0, kGates * H), w_hh);
    kernels::backward_m(dm, act_t, grad_proj_t, grad_hm.select(0, t));
  }

  // The gradient of h0 is one more recurrent product, dhm_0 Wmh, plus (lengths) what rows that never
  // started passed straight through.
  Tensor grad_h0;
  if (T == 0) {
    grad_h0 = at::zeros({B, H}, f32);
  } else {
    grad_h0 = at::empty({B, H}, f32);
    gemm(grad_h0, grad_hm.select(0, 0), w_hm);
    if (len.defined()) {
      Tensor carried = at::empty({B, H}, f32);
      kernels::carry_hidden_gradient(grad_h0, dh, carried, len, 0);
      grad_h0 = carried;
    }
  }

  // The weight gradients as large GEMMs over all T*B rows (fastmlstm.ops.interface.recurrent_weight_grads):
  // dWh = sum_t dz_t^T m_t with m_t = xm_t * hm_t recomputed from act; dWmh = sum_t dhm_t^T h_{t-1}.
  Tensor grad_weight_hh, grad_weight_hm;
  if (T == 0) {
    grad_weight_hh = at::zeros({kGates * H, H}, options);
    grad_weight_hm = at::zeros({H, H}, options);
  } else {
    Tensor m = at::empty({T * B, H}, options);
    kernels::recompute_m(act, m);
    const Tensor dz = grad_proj.view({T * B, 5 * H}).narrow(1, 0, kGates * H);
    grad_weight_hh = at::mm(dz.t(), m);
    // h_{t-1} is output[t-1] for t >= 1 and h0 at t = 0: two GEMMs instead of concatenating a copy.
    grad_weight_hm = at::mm(grad_hm.select(0, 0).t(), h0.to(dtype));
    if (T > 1) {
      grad_weight_hm.addmm_(grad_hm.narrow(0, 1, T - 1).reshape({-1, H}).t(),
                            output.narrow(0, 0, T - 1).reshape({-1, H}));
    }
  }
  return {grad_proj, grad_weight_hh, grad_weight_hm, grad_h0, dc};
}

}  // namespace
}  // namespace fastmlstm

// The namespace is fixed (not TORCH_EXTENSION_NAME): the JIT build and the ahead-of-time build
// register the same operators, and only one of them is ever loaded into a process. The tests' host
// build defines another one, so that it can share a process with the real extension.
#ifndef FASTMLSTM_OPS_NAMESPACE
#define FASTMLSTM_OPS_NAMESPACE fastmlstm_cuda
#endif
// One more macro level, so that FASTMLSTM_OPS_NAMESPACE is expanded before torch pastes it.
#define FASTMLSTM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define FASTMLSTM_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

FASTMLSTM_LIBRARY(FASTMLSTM_OPS_NAMESPACE, m) {
  m.def(
      "forward(Tensor proj, Tensor weight_hh, Tensor weight_hm, Tensor h0, Tensor c0, Tensor? lengths, "
      "bool save_for_backward, bool return_cell_states, bool poison_buffers=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor? grad_output, Tensor? grad_c_n, Tensor? grad_cell_states, Tensor weight_hh, "
      "Tensor weight_hm, Tensor h0, Tensor c0, Tensor? lengths, Tensor output, Tensor cell_states, Tensor act, "
      "bool poison_buffers=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// One kernel for every backend key, so that a CPU tensor reaches the checks above and gets their
// message instead of the dispatcher's.
FASTMLSTM_LIBRARY_IMPL(FASTMLSTM_OPS_NAMESPACE, CompositeExplicitAutograd, m) {
  m.impl("forward", &fastmlstm::forward);
  m.impl("backward", &fastmlstm::backward);
}
