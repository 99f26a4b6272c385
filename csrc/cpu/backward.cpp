// The backward time loop of the CPU backend (the operators backward and backward_input) and the
// gradients summed over time. Legend and the shape of the loops: driver.h.
//
// The time loop mirrors the forward's two passes per step. The gradients that are sums over time
// (the recurrent weights' and, with the input projection in the loop, the input weights' and the
// bias's) are accumulated in float32 every Tc steps, as GEMMs over that chunk's Tc * B rows, while
// the chunk is still in cache: the [T, B, H] and [T, B, 5H] intermediate gradients are never
// materialized. 16-bit values are widened chunk by chunk (exactly), so every product accumulates in
// float32 whatever the dtype; the sums are rounded to the dtype once, at the end.

#include "driver.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace fastmlstm {
namespace cpu {
namespace {

struct BackwardArgs {
  Tensor grad_output, grad_cells, packed_hh_t, packed_hm_t, h0, c0, lengths, output, cell_states, act;
  Tensor dc;            // [B, H] float: the gradient of c_T on entry (grad_c_n or zeros), of c0 on exit
  Tensor grad_proj;     // [T, B, 5H] D, filled when given (the proj contract); else only chunks exist
  Tensor x, weight_in;  // the input projection's x [T, B, I] and [5H, I] weight, when computed in the loop
  Layout layout = kFloat32;
  Packing p_hh_t{}, p_hm_t{};  // the packings of packed_hh_t and packed_hm_t
  bool portable = false;  // VNNI weights through the portable twin
  bool poison = false;
};

struct BackwardResult {
  Tensor grad_weight_hh, grad_weight_hm, grad_h0;  // float32 sums; grad_h0 [B, H]
  Tensor grad_x, grad_weight_in;  // with the input projection: x's gradient (D) and [5H, I + 1] float32 sums
                                  // of the input weights' gradient and, in the last column, the bias's
};

int64_t chunk_steps(int64_t T, int64_t B, int64_t H) {
  // About 1024 rows per gradient GEMM (GEMMs of a few hundred rows ran slower, see bench/kernels/NOTES.md;
  // and the fewer chunks, the fewer passes over the [4H, H] accumulator), with the chunk's
  // [Tc * B, 5H] gradient under 16 MiB of float32 (below glibc's mmap threshold: reused, not
  // page-faulted).
  const int64_t by_rows = std::max<int64_t>(1, 1024 / B);
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(16) << 20) / (B * 5 * H * 4));
  return std::max<int64_t>(1, std::min({T, by_rows, by_memory}));
}

// rows of a D tensor as float32 [rows, cols]: the tensor itself for float, else widened into scratch.
template <typename D>
Tensor widened(const Tensor& in, const Tensor& scratch, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<D, float>) {
    return in;
  } else {
    Tensor out = scratch.narrow(0, 0, rows * cols).view({rows, cols});
    widen_kernel<D>()(rows, cols, in.data_ptr<D>(), in.stride(0), out.data_ptr<float>());
    return out;
  }
}

// One backward pass over T steps, from t = T - 1 down to 0: the operands of the step GEMMs, the
// buffers of the open chunk of steps, and the sums over time. run() is the time loop; each step's
// two products and epilogues are step(), the sums over a chunk flush_chunk(), the gradient of h0
// after the loop h0_gradient().
template <typename D, typename E>
class BackwardPass {
 public:
  explicit BackwardPass(const BackwardArgs& args);
  BackwardResult run();

 private:
  void step(int64_t t, int64_t t0, int64_t t1, const RowGroup& g, const int64_t* len_g, bool parallel);
  const E* dhm_operand(int64_t s, int64_t s0, int64_t first) const;
  void flush_chunk(int64_t t0, int64_t t1);
  void flush_chunk_bf16(int64_t t0, int64_t t1);
  void h0_gradient();

  // The GEMM operands dz_t and dhm_t: with float32 activations and operands, the D gradients
  // themselves (dz is the first 4H columns of dproj's rows); otherwise E copies of them.
  static constexpr bool alias = std::is_same_v<D, float> && std::is_same_v<E, float>;
  static constexpr bool wide = std::is_same_v<D, float>;

  const BackwardArgs& a;
  const int64_t T, B, H;
  const StepKernels<D, E>& k;
  const bool fused;  // the input projection is computed in the loop (backward_input)
  const bool whole;  // grad_proj is wanted whole (backward), not only chunk by chunk
  const int64_t I;
  const int64_t Tc;  // steps per chunk
  // bfloat16 activations on a CPU that multiplies bfloat16 natively (the VNNI layout through
  // oneDNN, not the portable twin): the sums over a chunk are bfloat16 GEMMs too (flush_chunk_bf16).
  const bool native_bf16;
  PackedView<E> w_rec, w_dm;
  Tensor dz_op, dhm_op;
  E* dz_p = nullptr;
  E* dhm_p = nullptr;
  int64_t ld_dz = 0;
  Tensor dh;
  float* dh_p = nullptr;
  float* dc_p = nullptr;
  // Chunk buffers: the D gradients of Tc steps (unless grad_proj is wanted whole) and float32 copies.
  Tensor gproj_chunk, ghm_chunk, scratch_proj, scratch_hm, scratch_h, m_chunk;
  BackwardResult r;
  Tensor x_1, w_in_f, grad_weight_in_1;  // [x | 1], the input weight in float32, and their sums
  const D* gout_p = nullptr;
  const float* gcells_p = nullptr;
  const D* act_p = nullptr;
  const float* cells_p = nullptr;
  const float* c0_p = nullptr;
  const int64_t* len_p = nullptr;
  std::vector<float> tiles;
};

template <typename D, typename E>
BackwardPass<D, E>::BackwardPass(const BackwardArgs& args)
    : a(args),
      T(args.act.size(0)),
      B(args.act.size(1)),
      H(args.act.size(2) / 6),
      k(kernels<D, E>()),
      fused(args.x.defined()),
      whole(args.grad_proj.defined()),
      I(fused ? args.x.size(2) : 0),
      Tc(chunk_steps(T, B, H)),
      native_bf16(std::is_same_v<D, BFloat16> && args.layout == kVnni && !args.portable) {
  const auto options = a.output.options();
  const auto f32 = options.dtype(at::kFloat);
  // Wmh^T [H, H] and Wh^T [H, 4H], both plain: rec = dhm Wmh, dm = dz Wh.
  w_rec = view_of<E>(a.packed_hm_t, a.p_hm_t, a.portable);
  w_dm = view_of<E>(a.packed_hh_t, a.p_hh_t, a.portable);
  const auto e_options = options.dtype(c10::CppTypeToScalarType<E>::value);
  dz_op = alias ? Tensor() : at::empty({B, kGates * H}, e_options);
  dhm_op = alias ? Tensor() : at::empty({B, H}, e_options);
  dz_p = alias ? nullptr : dz_op.data_ptr<E>();
  dhm_p = alias ? nullptr : dhm_op.data_ptr<E>();
  ld_dz = alias ? 5 * H : kGates * H;
  // dh carries the full gradient that reached h_{t+1}; dc the one of c_t.
  dh = at::zeros({B, H}, f32);
  dh_p = dh.data_ptr<float>();
  dc_p = a.dc.data_ptr<float>();

  gproj_chunk = whole ? Tensor() : new_buffer({Tc, B, 5 * H}, options, a.poison);
  ghm_chunk = new_buffer({Tc, B, H}, options, a.poison);
  const bool widen = !wide && !native_bf16;
  scratch_proj = widen ? at::empty({Tc * B * 5 * H}, f32) : Tensor();
  scratch_hm = widen ? at::empty({Tc * B * H}, f32) : Tensor();
  scratch_h = widen ? at::empty({Tc * B * H}, f32) : Tensor();
  m_chunk = at::empty({Tc * B * H}, native_bf16 ? options : f32);
  r.grad_weight_hh = at::zeros({kGates * H, H}, f32);
  r.grad_weight_hm = at::zeros({H, H}, f32);
  r.grad_h0 = T > 0 ? new_buffer({B, H}, f32, a.poison) : at::zeros({B, H}, f32);
  if (fused) {
    // [x | 1]: one GEMM gives the input weights' gradient and, in its last column, the bias's.
    x_1 = at::empty({T * B, I + 1}, native_bf16 ? options : f32);
    x_1.narrow(1, 0, I).copy_(a.x.reshape({T * B, I}));
    x_1.narrow(1, I, 1).fill_(1.0);
    w_in_f = native_bf16 ? a.weight_in : a.weight_in.to(at::kFloat);
    grad_weight_in_1 = at::zeros({5 * H, I + 1}, f32);
    r.grad_x = new_buffer({T, B, I}, options, a.poison);
  }

  gout_p = ptr_or_null<D>(a.grad_output);
  gcells_p = ptr_or_null<float>(a.grad_cells);
  act_p = a.act.data_ptr<D>();
  cells_p = a.cell_states.data_ptr<float>();
  c0_p = a.c0.data_ptr<float>();
  len_p = ptr_or_null<int64_t>(a.lengths);
  tiles = tile_buffers();
}

template <typename D, typename E>
BackwardResult BackwardPass<D, E>::run() {
  const int64_t G = row_groups(B, packed_bytes(w_rec) + packed_bytes(w_dm));
  for (int64_t t1 = T; t1 > 0; t1 -= Tc) {  // chunks of steps [t0, t1), from the end
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc);
    for_each_row_group<E>(G, B, len_p, [&](const RowGroup& group, const int64_t* len_g, bool parallel) {
      for (int64_t t = t1 - 1; t >= t0; --t) {
        step(t, t0, t1, group, len_g, parallel);
      }
    });
    flush_chunk(t0, t1);
  }
  if (T > 0) {
    h0_gradient();
  }
  r.grad_weight_in = grad_weight_in_1;
  return r;
}

// dhm of step s (rows from `first`) as the operand of the product of step s - 1: the chunk buffer
// of s's chunk [s0, ...) (with float32 operands), else the E copy every step overwrites.
template <typename D, typename E>
const E* BackwardPass<D, E>::dhm_operand(int64_t s, int64_t s0, int64_t first) const {
  if constexpr (alias) {
    return reinterpret_cast<const E*>(ghm_chunk.data_ptr<D>()) + ((s - s0) * B + first) * H;
  } else {
    return dhm_p + first * H;
  }
}

// Step t of the chunk [t0, t1) for the rows of group g: rec = dhm_{t+1} Wmh with backward_cell,
// then dm = dz_t Wh with backward_m, tile by tile (parallel: over all threads).
template <typename D, typename E>
void BackwardPass<D, E>::step(int64_t t, int64_t t0, int64_t t1, const RowGroup& g, const int64_t* len_g,
                              bool parallel) {
  const bool has_rec = t < T - 1;
  const int64_t S = g.stride, Bg = g.count(B), row = t * B + g.first, chunk_row = (t - t0) * B + g.first;
  const int64_t ld_h = S * H, ld_act = S * 6 * H, ld_proj = S * 5 * H, ld_dz_g = S * ld_dz;
  const D* act_t = act_p + row * 6 * H;
  const float* cell_t = cells_p + row * H;
  const float* cell_prev = t > 0 ? cell_t - B * H : c0_p + g.first * H;
  const D* gout_t = gout_p != nullptr ? gout_p + row * H : nullptr;
  const float* gcells_t = gcells_p != nullptr ? gcells_p + row * H : nullptr;
  D* dproj_t = whole ? a.grad_proj.data_ptr<D>() + row * 5 * H : gproj_chunk.data_ptr<D>() + chunk_row * 5 * H;
  D* ghm_t = ghm_chunk.data_ptr<D>() + chunk_row * H;
  E* dz_t = alias ? reinterpret_cast<E*>(dproj_t) : dz_p + g.first * ld_dz;
  E* dhm_t = alias ? reinterpret_cast<E*>(ghm_t) : dhm_p + g.first * H;
  // dhm_{t+1}: in this chunk, or (t + 1 = t1) the first step of the chunk done before.
  const E* dhm_next = has_rec ? (t + 1 < t1 ? dhm_operand(t + 1, t0, g.first) : dhm_operand(t1, t1, g.first))
                              : nullptr;
  float* dh_g = dh_p + g.first * H;
  float* dc_g = dc_p + g.first * H;
  auto tiles_of = [&](int64_t blocks, const auto& body) { for_tiles<E>(parallel, blocks, Bg, tiles, body); };
  tiles_of(w_rec.p.blocks, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
    const int64_t n0 = j * w_rec.p.units;
    const int64_t at = row0 * ld_h + n0;
    if (has_rec) {
      tile_gemm(n_rows, dhm_next + row0 * ld_h, ld_h, w_rec, j, tile, false);
    }
    k.backward_cell(n_rows, block_width(w_rec.p, j), H, has_rec ? tile : nullptr, w_rec.p.cols, dh_g + at,
                    dc_g + at, ld_h, gout_t != nullptr ? gout_t + at : nullptr, ld_h,
                    gcells_t != nullptr ? gcells_t + at : nullptr, ld_h, act_t + row0 * ld_act + n0, ld_act,
                    cell_t + at, cell_prev + at, ld_h, dproj_t + row0 * ld_proj + n0, ld_proj,
                    alias ? nullptr : dz_t + row0 * ld_dz_g + n0, ld_dz_g, len_g != nullptr ? len_g + row0 : nullptr,
                    t);
  });
  tiles_of(w_dm.p.blocks, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
    const int64_t n0 = j * w_dm.p.units;
    tile_gemm(n_rows, dz_t + row0 * ld_dz_g, ld_dz_g, w_dm, j, tile, false);
    k.backward_m(n_rows, block_width(w_dm.p, j), H, tile, w_dm.p.cols, act_t + row0 * ld_act + n0, ld_act,
                 dproj_t + row0 * ld_proj + n0, ld_proj, ghm_t + row0 * ld_h + n0, ld_h,
                 alias ? nullptr : dhm_t + row0 * ld_h + n0, ld_h);
  });
}

// The sums over the chunk of steps [t0, t1), whose gradients are in the chunk buffers.
template <typename D, typename E>
void BackwardPass<D, E>::flush_chunk(int64_t t0, int64_t t1) {
  if (native_bf16) {
    flush_chunk_bf16(t0, t1);
    return;
  }
  const int64_t steps = t1 - t0, R = steps * B;
  const Tensor gproj_d =
      (whole ? a.grad_proj.narrow(0, t0, steps) : gproj_chunk.narrow(0, 0, steps)).view({R, 5 * H});
  const Tensor gproj = widened<D>(gproj_d, scratch_proj, R, 5 * H);
  const Tensor dz = gproj.narrow(1, 0, kGates * H);
  Tensor m = m_chunk.narrow(0, 0, R * H).view({R, H});
  recompute_m_kernel<D>()(R, H, act_p + t0 * B * 6 * H, m.data_ptr<float>());
  const bool tiles = weight_grad_tiles();
  if (fused && tiles) {  // the input weights' gradient from the same transposed slices of gproj
    const InputSums sums{grad_weight_in_1.data_ptr<float>(), I + 1, x_1.data_ptr<float>() + t0 * B * (I + 1), I + 1, I};
    gradient_tiles(gproj, kGates * H, r.grad_weight_hh, m, &sums);
  } else {
    weight_gradient(r.grad_weight_hh, dz, m);
  }
  const Tensor dhm = widened<D>(ghm_chunk.narrow(0, 0, steps).view({R, H}), scratch_hm, R, H);
  // h_{t-1} is output[t-1] for t >= 1 and h0 at t = 0.
  int64_t first = 0;
  if (t0 == 0) {
    r.grad_weight_hm.addmm_(dhm.narrow(0, 0, B).t(), a.h0);
    first = B;
  }
  if (R > first) {
    const int64_t n = R - first;
    const Tensor h_prev_d = a.output.narrow(0, t0 == 0 ? 0 : t0 - 1, n / B).view({n, H});
    weight_gradient(r.grad_weight_hm, dhm.narrow(0, first, n), widened<D>(h_prev_d, scratch_h, n, H));
  }
  if (fused) {  // x's gradient, and with MKL the input weights' (the tiles summed it above)
    Tensor grad_x = r.grad_x.narrow(0, t0, steps).view({R, I});
    if (tiles) {
      Tensor out = wide ? grad_x : at::empty({R, I}, gproj.options());
      rows_gemm(R, I, 5 * H, gproj.data_ptr<float>(), gproj.stride(0), w_in_f.data_ptr<float>(), w_in_f.stride(0),
                out.data_ptr<float>(), I);
      if constexpr (!wide) {
        grad_x.copy_(out);
      }
    } else {
      grad_weight_in_1.addmm_(gproj.t(), x_1.narrow(0, t0 * B, R));
      grad_x.copy_(at::mm(gproj, w_in_f));
    }
  }
}

// flush_chunk with bfloat16 GEMMs (oneDNN's, which accumulate in float32): each product over the
// chunk is rounded to bfloat16 once and added to the float32 sums (the float32 GEMMs on widened
// copies ran at half the rate). m is recomputed in bfloat16 as recompute_m does (xm * hm rounded).
template <typename D, typename E>
void BackwardPass<D, E>::flush_chunk_bf16(int64_t t0, int64_t t1) {
  const int64_t steps = t1 - t0, R = steps * B;
  const Tensor gproj = (whole ? a.grad_proj.narrow(0, t0, steps) : gproj_chunk.narrow(0, 0, steps)).view({R, 5 * H});
  const Tensor act = a.act.narrow(0, t0, steps).view({R, 6 * H});
  Tensor m = m_chunk.narrow(0, 0, R * H).view({R, H});
  at::mul_out(m, act.narrow(1, 4 * H, H), act.narrow(1, 5 * H, H));
  r.grad_weight_hh.add_(at::mm(gproj.narrow(1, 0, kGates * H).t(), m));
  const Tensor dhm = ghm_chunk.narrow(0, 0, steps).view({R, H});
  int64_t first = 0;
  if (t0 == 0) {  // h_{-1} is h0, float32
    r.grad_weight_hm.addmm_(dhm.narrow(0, 0, B).t().to(at::kFloat), a.h0);
    first = B;
  }
  if (R > first) {
    const int64_t n = R - first;
    const Tensor h_prev = a.output.narrow(0, t0 == 0 ? 0 : t0 - 1, n / B).view({n, H});
    r.grad_weight_hm.add_(at::mm(dhm.narrow(0, first, n).t(), h_prev));
  }
  if (fused) {
    grad_weight_in_1.add_(at::mm(gproj.t(), x_1.narrow(0, t0 * B, R)));
    r.grad_x.narrow(0, t0, steps).view({R, I}).copy_(at::mm(gproj, w_in_f));
  }
}

// The gradient of h0 is one more recurrent product, dhm_0 Wmh, plus (lengths) what rows that never
// started passed straight through.
template <typename D, typename E>
void BackwardPass<D, E>::h0_gradient() {
  float* gh0_p = r.grad_h0.data_ptr<float>();
  const E* dhm_next = dhm_operand(0, 0, 0);  // dhm_0 (step 0 is in the chunk [0, ...))
  for_each_tile<E>(w_rec.p.blocks, B, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
    const int64_t at = row0 * H + j * w_rec.p.units;
    tile_gemm(n_rows, dhm_next + row0 * H, H, w_rec, j, tile, false);
    k.grad_h0(n_rows, block_width(w_rec.p, j), tile, w_rec.p.cols, dh_p + at, H, gh0_p + at, H,
              len_p != nullptr ? len_p + row0 : nullptr);
  });
}

struct BackwardInputs {
  Tensor grad_output, grad_c_n, grad_cells, h0, c0, lengths;
  Layout layout;
  Packing p_hh_t, p_hm_t;
};

// The checks both backward operators share; returns the optional inputs as (possibly undefined) tensors.
BackwardInputs check_backward(const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
                              const std::optional<Tensor>& grad_cell_states, const Tensor& packed_hh_t,
                              const Tensor& packed_hm_t, const Tensor& h0, const Tensor& c0,
                              const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& cell_states,
                              const Tensor& act) {
  check_activations(output, "output", 3, "[T, B, H]");
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  TORCH_CHECK(H > 0 && B > 0, kWho, "output must have B > 0 rows and H > 0 units, got shape ", output.sizes());
  const at::ScalarType dtype = output.scalar_type();
  TORCH_CHECK(act.dim() == 3 && cell_states.dim() == 3, kWho,
              "act and cell_states must be the [T, B, 6H] and [T, B, H] tensors saved by "
              "forward(save_for_backward=True), got shapes ",
              act.sizes(), " and ", cell_states.sizes());
  check_input(act, "act", dtype, {T, B, 6 * H});
  check_input(cell_states, "cell_states", at::kFloat, {T, B, H});
  const Layout layout = layout_of(packed_hh_t, "packed_hh_t", dtype);
  TORCH_CHECK(layout != kNarrow, kWho, "the backward takes float32 or VNNI-packed weights");
  const Packing p_hh_t = check_packed(packed_hh_t, "packed_hh_t", layout, dtype, H, kGates * H, false);
  const Packing p_hm_t = check_packed(packed_hm_t, "packed_hm_t", layout, dtype, H, H, false);
  check_state(h0, c0, lengths, B, H);
  check_optional(grad_output, "grad_output", dtype, {T, B, H});
  check_optional(grad_c_n, "grad_c_n", at::kFloat, {B, H});
  check_optional(grad_cell_states, "grad_cell_states", at::kFloat, {T, B, H});
  return {defined_or_undefined(grad_output), defined_or_undefined(grad_c_n), defined_or_undefined(grad_cell_states),
          h0, c0, defined_or_undefined(lengths), layout, p_hh_t, p_hm_t};
}

BackwardArgs backward_args(const BackwardInputs& in, const Tensor& packed_hh_t, const Tensor& packed_hm_t,
                           const Tensor& output, const Tensor& cell_states, const Tensor& act, bool poison,
                           bool portable) {
  BackwardArgs a;
  a.grad_output = in.grad_output;
  a.grad_cells = in.grad_cells;
  a.packed_hh_t = packed_hh_t;
  a.packed_hm_t = packed_hm_t;
  a.h0 = in.h0;
  a.c0 = in.c0;
  a.lengths = in.lengths;
  a.output = output;
  a.cell_states = cell_states;
  a.act = act;
  a.dc = in.grad_c_n.defined() ? in.grad_c_n.clone() : at::zeros_like(in.c0);
  a.layout = in.layout;
  a.p_hh_t = in.p_hh_t;
  a.p_hm_t = in.p_hm_t;
  a.poison = poison;
  a.portable = portable;
  return a;
}

BackwardResult run_backward(const BackwardArgs& a, at::ScalarType dtype) {
  BackwardResult r;
  dispatch_dtypes(dtype, operand_dtype(a.layout),
                  [&](auto d, auto e_) { r = BackwardPass<decltype(d), decltype(e_)>(a).run(); });
  return r;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& packed_hh_t, const Tensor& packed_hm_t,
    const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output,
    const Tensor& cell_states, const Tensor& act, bool poison_buffers, bool portable_bf16) {
  const BackwardInputs in = check_backward(grad_output, grad_c_n, grad_cell_states, packed_hh_t, packed_hm_t, h0, c0,
                                           lengths, output, cell_states, act);
  BackwardArgs a = backward_args(in, packed_hh_t, packed_hm_t, output, cell_states, act, poison_buffers, portable_bf16);
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  a.grad_proj = new_buffer({T, B, 5 * H}, output.options(), poison_buffers);
  const at::ScalarType dtype = output.scalar_type();
  const BackwardResult r = run_backward(a, dtype);
  return {a.grad_proj, r.grad_weight_hh.to(dtype), r.grad_weight_hm.to(dtype), r.grad_h0, a.dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_input(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_im, const Tensor& packed_hh_t, const Tensor& packed_hm_t, const Tensor& h0,
    const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& cell_states,
    const Tensor& act, bool poison_buffers, bool portable_bf16) {
  const BackwardInputs in = check_backward(grad_output, grad_c_n, grad_cell_states, packed_hh_t, packed_hm_t, h0, c0,
                                           lengths, output, cell_states, act);
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  const at::ScalarType dtype = output.scalar_type();
  check_activations(x, "x", 3, "[T, B, I]");
  const int64_t I = x.size(2);
  check_input(x, "x", dtype, {T, B, I});
  check_input(weight_ih, "weight_ih", dtype, {kGates * H, I});
  check_input(weight_im, "weight_im", dtype, {H, I});
  BackwardArgs a = backward_args(in, packed_hh_t, packed_hm_t, output, cell_states, act, poison_buffers, portable_bf16);
  a.x = x;
  a.weight_in = at::cat({weight_ih, weight_im}, 0);
  const BackwardResult r = run_backward(a, dtype);
  // Separate tensors (outputs of an operator may not alias each other).
  return {r.grad_x,
          r.grad_weight_in.narrow(0, 0, kGates * H).narrow(1, 0, I).to(dtype, false, /*copy=*/true),
          r.grad_weight_in.narrow(0, kGates * H, H).narrow(1, 0, I).to(dtype, false, /*copy=*/true),
          r.grad_weight_in.narrow(0, 0, kGates * H).select(1, I).to(dtype, false, /*copy=*/true),
          r.grad_weight_hh.to(dtype),
          r.grad_weight_hm.to(dtype),
          r.grad_h0,
          a.dc};
}

}  // namespace cpu
}  // namespace fastmlstm
