// The forward time loop of the CPU backend (the operators forward and forward_input): per step, the
// GEMM hm = h_{t-1} Wmh^T with the forward_m epilogue, then z = m Wh^T with forward_cell, tile by
// tile, column-parallel or row-parallel (driver.h, "RowGroup"). Legend and the shape of the loops:
// driver.h.

#include "driver.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

namespace fastmlstm {
namespace cpu {
namespace {

// Asks for a [rows, cols] block (row stride ld) to be brought into the cache hierarchy. The forward
// loop reads proj in narrow column slices of many rows (5H apart): the hardware prefetchers do not
// follow that pattern, and the reads missed to DRAM, the largest cost of the epilogues.
template <typename T>
inline void prefetch_block(const T* p, int64_t rows, int64_t cols, int64_t ld) {
#if defined(__GNUC__) || defined(__clang__)
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = reinterpret_cast<const char*>(p + r * ld);
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(row + b, 0, 2);
    }
    __builtin_prefetch(row + bytes - 1, 0, 2);
  }
#endif
}

// lengths [B] -> for each step, 1 + the last row still running (rows past it are skipped).
std::vector<int64_t> rows_to_compute(const Tensor& lengths, int64_t T, int64_t B) {
  std::vector<int64_t> rows(T, B);
  if (!lengths.defined()) {
    return rows;
  }
  std::fill(rows.begin(), rows.end(), 0);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < std::min(len[b], T); ++t) {
      rows[t] = b + 1;
    }
  }
  return rows;
}

template <typename E>
Tensor as_operand(const Tensor& tensor) {
  // E buffers hold D values: widening them to float32 is exact.
  return tensor.to(c10::CppTypeToScalarType<E>::value).contiguous();
}

// Where the input projections come from: proj [T, B, 5H] (D), or x [T, B, I] multiplied inside the
// loop. Then the gate GEMM runs on [m_t | x_t] [B, H + I] against [Wh | Wx] packed together (one
// tile GEMM with K = H + I; the bias is added in the epilogue), and xm = x Wmx^T, which does not
// depend on the recurrence, is one GEMM per chunk of steps into a small buffer: float32 from float32
// operands, or, where the loop's GEMMs multiply bfloat16 natively (VNNI weights) and Wmx^T comes
// as bfloat16, a bfloat16 GEMM (float32 sums rounded once to bfloat16, which is what the epilogue
// rounds a float32 xm to).
template <typename D, typename E>
struct Inputs {
  const D* proj = nullptr;
  const E* x = nullptr;     // [T, B, I] as E (copied next to m each step)
  Tensor x_xm, w_im_t;      // x [T * B, I] and Wmx^T [I, H] for the xm GEMMs, both float32 or bfloat16
  int64_t I = 0;
  const D* bias = nullptr;  // [4H] or null
};

struct ForwardState {
  Tensor output, c, cell_states, act;
};

// The forward time loop: run() goes over the steps (column-parallel) or over chunks of steps with
// one row group per thread (row-parallel, driver.h "RowGroup"); step() is one step of one group:
// hm = h_{t-1} Wmh^T with forward_m, then z = [m | x_t] [Wh | Wx]^T with forward_cell, tile by tile.
template <typename D, typename E>
class ForwardLoop {
 public:
  ForwardLoop(int64_t T, int64_t B, int64_t H, const Inputs<D, E>& in, const PackedView<E>& w_hh,
              const PackedView<E>& w_hm, const Tensor& h0, const Tensor& lengths, ForwardState& st,
              bool save_for_backward, bool keep_cells);
  void run();

 private:
  void xm_chunk_at(int64_t t);
  void step(int64_t t, const RowGroup& g, const int64_t* len_g, bool parallel);

  const int64_t T, B, H;
  const Inputs<D, E>& in;
  const PackedView<E>& w_hh;
  const PackedView<E>& w_hm;
  const StepKernels<D, E>& k;
  const bool fused;
  const int64_t I, ld_m;  // the gate GEMM's operand: m, then (fused) x_t
  Tensor h, mx, xm_chunk;  // the GEMM operands h and [m | x_t] (private buffers); xm of Tc steps
  const float* xm_f_p = nullptr;  // xm_chunk's data: float32, or D from the bfloat16 xm GEMM (one is set
  const D* xm_d_p = nullptr;      // with fused inputs)
  E* h_p;
  E* m_p;
  float* c_p;
  D* out_p;
  float* cells_p;
  D* act_p;
  const int64_t* len_p;
  std::vector<int64_t> rows;  // per step, 1 + the last row still running
  std::vector<float> tiles;
  int64_t Tc;  // steps per xm chunk (fused inputs)
};

template <typename D, typename E>
ForwardLoop<D, E>::ForwardLoop(int64_t T_, int64_t B_, int64_t H_, const Inputs<D, E>& in_,
                               const PackedView<E>& w_hh_, const PackedView<E>& w_hm_, const Tensor& h0,
                               const Tensor& lengths, ForwardState& st, bool save_for_backward, bool keep_cells)
    : T(T_), B(B_), H(H_), in(in_), w_hh(w_hh_), w_hm(w_hm_), k(kernels<D, E>()), fused(in_.proj == nullptr),
      I(fused ? in_.I : 0), ld_m(H_ + I) {
  h = h0.to(st.output.scalar_type()).to(c10::CppTypeToScalarType<E>::value, false, /*copy=*/true);
  mx = at::empty({B, ld_m}, h.options());
  h_p = h.data_ptr<E>();
  m_p = mx.data_ptr<E>();
  c_p = st.c.data_ptr<float>();
  out_p = st.output.data_ptr<D>();
  cells_p = keep_cells ? st.cell_states.data_ptr<float>() : nullptr;
  act_p = save_for_backward ? st.act.data_ptr<D>() : nullptr;
  len_p = ptr_or_null<int64_t>(lengths);
  // Inference skips the rows past the last running one (featurize sorts texts longest first).
  // Training computes every row: the saved gates of padded rows are part of the contract.
  rows = save_for_backward ? std::vector<int64_t>(T, B) : rows_to_compute(lengths, T, B);
  tiles = tile_buffers();
  Tc = fused ? std::max<int64_t>(1, std::min<int64_t>(T, 512 / B)) : T;
  // (An empty proj has no data: a T = 0 run looks fused, with no x either.)
  const at::ScalarType xm_dtype = in.x_xm.defined() ? in.x_xm.scalar_type() : at::kFloat;
  xm_chunk = fused ? at::empty({Tc * B, H}, st.c.options().dtype(xm_dtype)) : Tensor();
  xm_f_p = fused && xm_dtype == at::kFloat ? xm_chunk.data_ptr<float>() : nullptr;
  xm_d_p = fused && xm_dtype != at::kFloat ? static_cast<const D*>(xm_chunk.data_ptr()) : nullptr;
}

// xm = x Wmx^T for the chunk of steps from t: one GEMM (fused inputs), outside the time loop. In
// float32 always as row tiles (rows_gemm), whatever weight_grad_tiles() says for the backward's
// GEMMs: a row's sums then never depend on how many rows the chunk has or on the thread count
// (MKL's do, in the last bits), so a sequence run in pieces, or step by step, repeats the one-shot
// run bit for bit on every CPU.
template <typename D, typename E>
void ForwardLoop<D, E>::xm_chunk_at(int64_t t) {
  const int64_t steps = std::min(Tc, T - t);
  Tensor out = xm_chunk.narrow(0, 0, steps * B);
  const Tensor x = in.x_xm.narrow(0, t * B, steps * B);
  const Tensor& w = in.w_im_t;
  if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.stride(1) == 1 && w.stride(1) == 1) {
    rows_gemm(steps * B, H, in.I, x.data_ptr<float>(), x.stride(0), w.data_ptr<float>(), w.stride(0),
              out.data_ptr<float>(), H);
  } else {
    at::mm_out(out, x, w);
  }
}

template <typename D, typename E>
void ForwardLoop<D, E>::run() {
  const int64_t G = row_groups(B, packed_bytes(w_hh) + packed_bytes(w_hm));
  for (int64_t t0 = 0; t0 < T; t0 += Tc) {
    const int64_t t1 = std::min(T, t0 + Tc);
    if (fused) {
      xm_chunk_at(t0);
    }
    for_each_row_group<E>(G, B, len_p, [&](const RowGroup& group, const int64_t* len_g, bool parallel) {
      for (int64_t t = t0; t < t1; ++t) {
        step(t, group, len_g, parallel);
      }
    });
  }
}

template <typename D, typename E>
void ForwardLoop<D, E>::step(int64_t t, const RowGroup& g, const int64_t* len_g, bool parallel) {
  const int64_t M = g.count(rows[t]), Bg = g.count(B), S = g.stride;
  // The group's first row of every per-row array, and the row strides between its rows.
  const int64_t at_row = t * B + g.first;
  const D* proj_t = fused ? nullptr : in.proj + at_row * 5 * H;
  const D* proj_next = !fused && t + 1 < T ? proj_t + B * 5 * H : nullptr;
  D* out_t = out_p + at_row * H;
  float* cell_t = cells_p != nullptr ? cells_p + at_row * H : nullptr;
  D* act_t = act_p != nullptr ? act_p + at_row * 6 * H : nullptr;
  E* h_g = h_p + g.first * H;
  float* c_g = c_p + g.first * H;
  E* m_g = m_p + g.first * ld_m;
  // The step's xm rows in the chunk buffer (fused inputs): float32, or D from the bfloat16 GEMM.
  const int64_t xm_at = ((t % Tc) * B + g.first) * H;
  const float* xm_t = xm_f_p != nullptr ? xm_f_p + xm_at : nullptr;
  const D* xm_d_t = xm_d_p != nullptr ? xm_d_p + xm_at : nullptr;
  const int64_t ld_h = S * H, ld_proj = S * 5 * H, ld_act = S * 6 * H, ld_mg = S * ld_m;
  if (fused) {
    const E* x_t = in.x + at_row * I;
    for (int64_t i = 0; i < M; ++i) {
      std::memcpy(m_g + i * ld_mg + H, x_t + i * S * I, I * sizeof(E));
    }
  }
  if (M < Bg) {
    k.carry_state(Bg - M, H, h_g + M * ld_h, ld_h, c_g + M * ld_h, ld_h, out_t + M * ld_h, ld_h,
                  cell_t != nullptr ? cell_t + M * ld_h : nullptr, ld_h);
  }
  if (M == 0) {
    return;
  }
  auto tiles_of = [&](int64_t blocks, const auto& body) { for_tiles<E>(parallel, blocks, M, tiles, body); };
  tiles_of(w_hm.p.blocks, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
    const int64_t n0 = j * w_hm.p.units;
    const int64_t width = block_width(w_hm.p, j);
    tile_gemm(n_rows, h_g + row0 * ld_h, ld_h, w_hm, j, tile, false);
    if (!fused) {
      // The gate columns of these units, which the second pass reads.
      for (int64_t q = 0; q < kGates; ++q) {
        prefetch_block(proj_t + row0 * ld_proj + q * H + n0, n_rows, width, ld_proj);
      }
    }
    const D* xm_d = fused ? (xm_d_t != nullptr ? xm_d_t + row0 * ld_h + n0 : nullptr)
                          : proj_t + row0 * ld_proj + 4 * H + n0;
    k.forward_m(n_rows, width, H, tile, w_hm.p.cols, xm_d, fused ? ld_h : ld_proj,
                xm_t != nullptr ? xm_t + row0 * ld_h + n0 : nullptr, ld_h, m_g + row0 * ld_mg + n0, ld_mg,
                act_t != nullptr ? act_t + row0 * ld_act + n0 : nullptr, ld_act);
  });
  tiles_of(w_hh.p.blocks, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
    const int64_t n0 = j * w_hh.p.units;
    const int64_t units = block_units(w_hh.p, j);
    tile_gemm(n_rows, m_g + row0 * ld_mg, ld_mg, w_hh, j, tile, false);
    if (proj_next != nullptr) {  // the xm columns of these units, which the next step's first pass reads
      prefetch_block(proj_next + row0 * ld_proj + 4 * H + n0, n_rows, units, ld_proj);
    }
    // Fused inputs: the gate GEMM already holds x Wx^T, the bias is added to every row (row stride 0).
    const D* pre = fused ? (in.bias != nullptr ? in.bias + n0 : nullptr) : proj_t + row0 * ld_proj + n0;
    k.forward_cell(n_rows, units, H, tile, w_hh.p.cols, pre, fused ? 0 : ld_proj, h_g + row0 * ld_h + n0, ld_h,
                   c_g + row0 * ld_h + n0, ld_h, out_t + row0 * ld_h + n0, ld_h,
                   cell_t != nullptr ? cell_t + row0 * ld_h + n0 : nullptr, ld_h,
                   act_t != nullptr ? act_t + row0 * ld_act + n0 : nullptr, ld_act,
                   len_g != nullptr ? len_g + row0 : nullptr, t);
  });
}

ForwardState new_forward_state(int64_t T, int64_t B, int64_t H, const at::TensorOptions& options,
                               const Tensor& c0, bool save_for_backward, bool return_cell_states, bool poison) {
  const auto f32 = options.dtype(at::kFloat);
  const bool keep_cells = save_for_backward || return_cell_states;
  // Cell states the caller keeps are its own tensors; saved-only ones come from the buffer cache.
  Tensor cells = !keep_cells ? at::empty({0}, f32)
                 : return_cell_states ? new_buffer({T, B, H}, f32, poison)
                                      : saved_buffer({T, B, H}, f32, poison);
  return {new_buffer({T, B, H}, options, poison), c0.clone(), cells,
          save_for_backward ? saved_buffer({T, B, 6 * H}, options, poison) : at::empty({0}, options)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& proj, const Tensor& packed_hh,
                                                   const Tensor& packed_hm, const Tensor& h0, const Tensor& c0,
                                                   const std::optional<Tensor>& lengths, bool save_for_backward,
                                                   bool return_cell_states, bool poison_buffers,
                                                   bool portable_bf16) {
  check_activations(proj, "proj", 3, "[T, B, 5H]");
  TORCH_CHECK(proj.size(2) > 0 && proj.size(2) % 5 == 0, kWho,
              "proj's last dimension must be 5 * hidden_size, got ", proj.size(2));
  const int64_t T = proj.size(0), B = proj.size(1), H = proj.size(2) / 5;
  // (The loops share rows among threads: an empty batch goes to the reference backend.)
  TORCH_CHECK(B > 0, kWho, "proj must have B > 0 rows, got shape ", proj.sizes());
  const at::ScalarType dtype = proj.scalar_type();
  const Layout layout = layout_of(packed_hh, "packed_hh", dtype);
  const at::ScalarType e = operand_dtype(layout);
  const Packing p_hh = check_packed(packed_hh, "packed_hh", layout, dtype, kGates * H, H, true);
  const Packing p_hm = check_packed(packed_hm, "packed_hm", layout, dtype, H, H, false);
  check_state(h0, c0, lengths, B, H);
  ForwardState st = new_forward_state(T, B, H, proj.options(), c0, save_for_backward, return_cell_states,
                                      poison_buffers);
  const Tensor len = defined_or_undefined(lengths);
  dispatch_dtypes(dtype, e, [&](auto d, auto e_) {
    using D = decltype(d);
    using E = decltype(e_);
    Inputs<D, E> in;
    in.proj = proj.data_ptr<D>();
    const PackedView<E> w_hh = view_of<E>(packed_hh, p_hh, portable_bf16);
    const PackedView<E> w_hm = view_of<E>(packed_hm, p_hm, portable_bf16);
    ForwardLoop<D, E>(T, B, H, in, w_hh, w_hm, h0, len, st, save_for_backward,
                      save_for_backward || return_cell_states).run();
  });
  return {st.output, st.c, st.cell_states, st.act};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_input(
    const Tensor& x, const Tensor& weight_im_t, const std::optional<Tensor>& bias, const Tensor& packed_hh_ih,
    const Tensor& packed_hm, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    bool save_for_backward, bool return_cell_states, bool poison_buffers, bool portable_bf16) {
  check_activations(x, "x", 3, "[T, B, I]");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(I > 0 && B > 0, kWho, "x must have B > 0 rows and at least one feature, got shape ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(weight_im_t.defined() && weight_im_t.dim() == 2, kWho, "weight_im_t must be a [I, H] tensor");
  const int64_t H = weight_im_t.size(1);
  TORCH_CHECK(H > 0, kWho, "hidden_size must be positive");
  const Layout layout = layout_of(packed_hh_ih, "packed_hh_ih", dtype);
  // W_im^T is float32, or bfloat16 where the loop's GEMMs multiply bfloat16 natively.
  const bool bf16_xm = layout == kVnni && weight_im_t.scalar_type() == at::kBFloat16;
  check_input(weight_im_t, bf16_xm ? "weight_im_t (W_im^T)" : "weight_im_t (W_im^T, float32; bfloat16 with VNNI weights)",
              bf16_xm ? at::kBFloat16 : at::kFloat, {I, H});
  const at::ScalarType e = operand_dtype(layout);
  const Packing p_hh = check_packed(packed_hh_ih, "packed_hh_ih", layout, dtype, kGates * H, H + I, true);
  const Packing p_hm = check_packed(packed_hm, "packed_hm", layout, dtype, H, H, false);
  check_optional(bias, "bias", dtype, {kGates * H});
  check_state(h0, c0, lengths, B, H);
  ForwardState st = new_forward_state(T, B, H, x.options(), c0, save_for_backward, return_cell_states,
                                      poison_buffers);
  const Tensor len = defined_or_undefined(lengths);
  const Tensor b = defined_or_undefined(bias);
  dispatch_dtypes(dtype, e, [&](auto d, auto e_) {
    using D = decltype(d);
    using E = decltype(e_);
    // x as the gate GEMM's operand dtype, and for the xm GEMMs (float32 unless bf16_xm; both the
    // same tensor where they agree).
    const Tensor x_e = std::is_same_v<E, float> ? x.to(at::kFloat).reshape({T * B, I}) : as_operand<E>(x);
    Inputs<D, E> in;
    in.x = x_e.data_ptr<E>();
    in.x_xm = bf16_xm || std::is_same_v<E, float> ? x_e.reshape({T * B, I}) : x.to(at::kFloat).reshape({T * B, I});
    in.w_im_t = weight_im_t;
    in.I = I;
    in.bias = ptr_or_null<D>(b);
    const PackedView<E> w_hh = view_of<E>(packed_hh_ih, p_hh, portable_bf16);
    const PackedView<E> w_hm = view_of<E>(packed_hm, p_hm, portable_bf16);
    ForwardLoop<D, E>(T, B, H, in, w_hh, w_hm, h0, len, st, save_for_backward,
                      save_for_backward || return_cell_states).run();
  });
  return {st.output, st.c, st.cell_states, st.act};
}

}  // namespace cpu
}  // namespace fastmlstm
