// Host driver of the CPU backend: input checks, weight packing, the time loops with their GEMMs and
// fused epilogues, the weight gradients, and the operator registration (torch.ops.fastmlstm_cpu.*).
//
// Legend: T time, B batch rows, H hidden units, G = 4 gates (i, f, o, u); D the activation dtype,
// E the GEMM operand dtype (mlstm_cpu.h). The contract, shapes and numerics are those of
// fastmlstm/ops/common.py; the order of operations follows fastmlstm/ops/reference.py.
//
// Per forward step, two GEMMs that depend on each other, each run as one pass over column blocks
// of a packed weight (at::parallel_for over blocks, the blocks' rows in tiles of at most kRowBlock):
//   hm = h_{t-1} Wmh^T  -> per tile, forward_m:    m = xm * hm (and save xm, hm)
//   z  = m Wh^T         -> per tile, forward_cell: gates, c_t, h_t, lengths mask (Wh's rows are
//                          permuted so that one tile holds the four gates of 16 hidden units)
// Per backward step, mirrored:
//   rec = dhm_{t+1} Wmh -> per tile, backward_cell: dh_t, dz_t, dc_{t-1}
//   dm  = dz_t Wh       -> per tile, backward_m:    dxm_t, dhm_t
// A tile's epilogue runs right after its GEMM, while the tile is in L1: z, hm, rec and dm never
// exist as [B, 4H] or [B, H] arrays. The weight gradients are two large GEMMs after the loop.
//
// The tile GEMMs are at::native::cpublas::brgemm (oneDNN's batch-reduce GEMM micro-kernels where
// oneDNN supports the CPU, else ATen's gemm) on weights packed once per weight
// (fastmlstm/ops/cpu/recurrence.py keeps the packed copies while a weight is unchanged): float32
// blocks [K, 32] in general, VNNI-packed bfloat16 blocks where the CPU multiplies bfloat16 natively.
// Every GEMM accumulates in float32 and writes a float32 tile. A row's result never depends on T,
// on which rows are computed with it, or on the thread count, so a chunked run repeats the one-shot
// run bit for bit.

#include "mlstm_cpu.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace fastmlstm {
namespace cpu {
namespace {

using at::Tensor;
using c10::BFloat16;
using c10::Half;

constexpr const char* kWho = "fastmlstm cpu backend: ";

// ------------------------------------------------------------------------------------------------
// Instruction set of the epilogues: AVX2 wherever ATen itself runs AVX2 or AVX-512 kernels.

bool use_avx2() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

template <typename D, typename E>
const StepKernels<D, E>& kernels() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::step_kernels<D, E>();
  }
#endif
  return isa_default::step_kernels<D, E>();
}

template <typename D, typename Out>
RecomputeM<D, Out> recompute_m_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::recompute_m<D, Out>();
  }
#endif
  return isa_default::recompute_m<D, Out>();
}

Fingerprint fingerprint_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return &isa_avx2::fingerprint;
  }
#endif
  return &isa_default::fingerprint;
}

// ------------------------------------------------------------------------------------------------
// Input checks.

bool is_activation_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_input(const Tensor& tensor, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(tensor.defined(), kWho, name, " is missing");
  TORCH_CHECK(tensor.device().is_cpu(), kWho, name, " must be a CPU tensor, got one on ", tensor.device(),
              " (the 'cpu' backend runs on CPU tensors only)");
  TORCH_CHECK(tensor.scalar_type() == dtype, kWho, name, " must have dtype ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == shape, kWho, name, " must have shape ", shape, ", got ", tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), kWho, name, " must be contiguous (call .contiguous() first); got strides ",
              tensor.strides());
}

void check_optional(const std::optional<Tensor>& tensor, const char* name, at::ScalarType dtype,
                    at::IntArrayRef shape) {
  if (tensor.has_value() && tensor->defined()) {
    check_input(*tensor, name, dtype, shape);
  }
}

Tensor value_or_undefined(const std::optional<Tensor>& tensor) {
  return tensor.has_value() ? *tensor : Tensor();
}

template <typename T>
T* ptr_or_null(const Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

// A buffer the kernels overwrite completely. Tests ask for NaN-filled buffers so that an element a
// kernel forgets to write fails the comparison instead of passing by luck.
Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  if (poison) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(shape, options);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// Packed weights. A weight W [N, K] (torch's [out, in] layout, used as x W^T) becomes column blocks
// of kColumnBlock (32) output columns each, zero-padded:
//   float32  [blocks, K, 32]        block j, row k, column c = W[row(j, c), k]
//   VNNI     [blocks, K/2, 32, 2]   the same, with pairs of consecutive k interleaved (bfloat16)
// row(j, c) is j * 32 + c for a plain weight. For the gate weight Wh [4H, H] ("gates") a block
// holds q = 8 hidden units and its columns are [i(q) f(q) o(q) u(q)]: row(j, c) = g * H + j * q + c'
// with g = c / q_j, c' = c % q_j (the last block has q_j = H - j * q units).

struct Packing {
  int64_t N, K, blocks, units;  // units: output columns (plain) or hidden units (gates) per block
  bool gates, vnni;
};

Packing packing_of(int64_t N, int64_t K, bool gates, bool vnni) {
  const int64_t units = gates ? kColumnBlock / kGates : kColumnBlock;
  const int64_t outputs = gates ? N / kGates : N;
  return {N, K, ceil_div(outputs, units), units, gates, vnni};
}

// Output columns of block j and the weight row each one reads.
int64_t block_width(const Packing& p, int64_t j) {
  const int64_t outputs = p.gates ? p.N / kGates : p.N;
  const int64_t units = std::min(p.units, outputs - j * p.units);
  return p.gates ? kGates * units : units;
}

int64_t block_units(const Packing& p, int64_t j) {
  const int64_t outputs = p.gates ? p.N / kGates : p.N;
  return std::min(p.units, outputs - j * p.units);
}

int64_t source_row(const Packing& p, int64_t j, int64_t c) {
  if (!p.gates) {
    return j * p.units + c;
  }
  const int64_t units = block_units(p, j);
  const int64_t hidden = p.N / kGates;
  return (c / units) * hidden + j * p.units + c % units;
}

template <typename In, typename Out>
void pack_blocks(const In* weight, Out* out, const Packing& p) {
  const int64_t block_elems = p.K * kColumnBlock;
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Out* block = out + j * block_elems;
      std::fill(block, block + block_elems, Out(0));
      const int64_t width = block_width(p, j);
      for (int64_t c = 0; c < width; ++c) {
        const In* row = weight + source_row(p, j, c) * p.K;
        if (p.vnni) {
          for (int64_t k = 0; k < p.K; ++k) {
            block[(k / 2) * kColumnBlock * 2 + c * 2 + (k % 2)] = static_cast<Out>(row[k]);
          }
        } else {
          for (int64_t k = 0; k < p.K; ++k) {
            block[k * kColumnBlock + c] = static_cast<Out>(row[k]);
          }
        }
      }
    }
  });
}

// weight [N, K] (float32, float16 or bfloat16) -> packed. native: VNNI bfloat16 blocks for the CPU's
// bfloat16 GEMM (bfloat16 weights only); otherwise float32 blocks (exact for every input dtype).
Tensor pack_weight(const Tensor& weight, bool gates, bool native) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), kWho, "pack_weight expects a CPU tensor");
  TORCH_CHECK(weight.dim() == 2, kWho, "pack_weight expects a 2-D weight [N, K], got shape ", weight.sizes());
  TORCH_CHECK(is_activation_dtype(weight.scalar_type()), kWho,
              "pack_weight expects float32, float16 or bfloat16, got ", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N > 0 && K > 0, kWho, "pack_weight expects a non-empty weight, got shape ", weight.sizes());
  TORCH_CHECK(!gates || N % kGates == 0, kWho, "a gate weight must have 4 * hidden_size rows, got ", N);
  TORCH_CHECK(!native || (weight.scalar_type() == at::kBFloat16 && K % 2 == 0), kWho,
              "native packing takes a bfloat16 weight with an even number of columns, got ", weight.scalar_type(),
              " with ", K);
  const Tensor w = weight.contiguous();
  const Packing p = packing_of(N, K, gates, native);
  if (native) {
    Tensor out = at::empty({p.blocks, K / 2, kColumnBlock, 2}, weight.options());
    pack_blocks(w.data_ptr<BFloat16>(), out.data_ptr<BFloat16>(), p);
    return out;
  }
  Tensor out = at::empty({p.blocks, K, kColumnBlock}, weight.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fastmlstm_cpu_pack", [&] {
    pack_blocks(w.data_ptr<scalar_t>(), out.data_ptr<float>(), p);
  });
  return out;
}

// The layout a packed tensor must have to serve as the weight [N, K] of a GEMM with operand dtype E.
void check_packed(const Tensor& packed, const char* name, at::ScalarType operand_dtype, int64_t N, int64_t K,
                  bool gates) {
  TORCH_CHECK(packed.defined() && packed.device().is_cpu(), kWho, name, " must be a CPU tensor");
  TORCH_CHECK(packed.is_contiguous(), kWho, name, " must be contiguous");
  TORCH_CHECK(packed.scalar_type() == operand_dtype, kWho, name, " must have dtype ", operand_dtype, ", got ",
              packed.scalar_type(), " (pack it with pack_weight for this activation dtype)");
  const Packing p = packing_of(N, K, gates, operand_dtype != at::kFloat);
  if (p.vnni) {
    TORCH_CHECK(packed.sizes() == at::IntArrayRef({p.blocks, K / 2, kColumnBlock, 2}), kWho, name,
                " must have the packed shape ", at::IntArrayRef({p.blocks, K / 2, kColumnBlock, 2}), " of a [", N,
                ", ", K, "] weight, got ", packed.sizes());
  } else {
    TORCH_CHECK(packed.sizes() == at::IntArrayRef({p.blocks, K, kColumnBlock}), kWho, name,
                " must have the packed shape ", at::IntArrayRef({p.blocks, K, kColumnBlock}), " of a [", N, ", ", K,
                "] weight, got ", packed.sizes());
  }
}

// ------------------------------------------------------------------------------------------------
// Tile GEMMs: C [M, N] (float32, row stride ldc) = A [M, K] (row stride lda) x block j.

template <typename E>
struct PackedView {
  const E* data;
  Packing p;
  const E* block(int64_t j) const { return data + j * p.K * kColumnBlock; }
};

template <typename E>
void tile_gemm(int64_t M, int64_t N, const E* A, int64_t lda, const PackedView<E>& w, int64_t j, float* C) {
  if constexpr (std::is_same_v<E, float>) {
    at::native::cpublas::brgemm(M, N, w.p.K, lda, kColumnBlock, kColumnBlock, false, A, w.block(j), C, false);
  } else {
    at::native::cpublas::brgemm(M, N, w.p.K, lda, kColumnBlock, kColumnBlock, false, A, w.block(j), C, true);
  }
}

template <typename E>
void release_gemm() {
  if constexpr (!std::is_same_v<E, float>) {
    at::native::cpublas::brgemm_release(true);  // AMX tiles, where the GEMM used them
  }
}

// One GEMM pass of a step over rows [0, M): for every column block and row tile, the GEMM into a
// per-thread tile buffer, then epilogue(j, row0, rows, tile).
template <typename E, typename Epilogue>
void gemm_pass(int64_t M, const E* A, int64_t lda, const PackedView<E>& w, std::vector<float>& tiles,
               const Epilogue& epilogue) {
  const int64_t tile_elems = kRowBlock * kColumnBlock;
  at::parallel_for(0, w.p.blocks, 1, [&](int64_t begin, int64_t end) {
    float* tile = tiles.data() + at::get_thread_num() * tile_elems;
    for (int64_t j = begin; j < end; ++j) {
      const int64_t width = block_width(w.p, j);
      for (int64_t row0 = 0; row0 < M; row0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - row0);
        if (A != nullptr) {
          tile_gemm(rows, width, A + row0 * lda, lda, w, j, tile);
        }
        epilogue(j, row0, rows, A != nullptr ? tile : nullptr);
      }
    }
    release_gemm<E>();
  });
}

std::vector<float> tile_buffers() {
  return std::vector<float>(at::get_num_threads() * kRowBlock * kColumnBlock);
}

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

struct Sizes {
  int64_t T, B, H;
};

Sizes check_proj(const Tensor& proj) {
  TORCH_CHECK(proj.defined(), kWho, "proj is missing");
  TORCH_CHECK(proj.device().is_cpu(), kWho, "proj must be a CPU tensor, got one on ", proj.device(),
              " (the 'cpu' backend runs on CPU tensors only; use backend='triton' or 'cuda' on a GPU)");
  TORCH_CHECK(is_activation_dtype(proj.scalar_type()), kWho, "proj must be float32, float16 or bfloat16, got ",
              proj.scalar_type());
  TORCH_CHECK(proj.dim() == 3, kWho, "proj must be 3-D [T, B, 5H], got shape ", proj.sizes());
  TORCH_CHECK(proj.size(2) > 0 && proj.size(2) % 5 == 0, kWho,
              "proj's last dimension must be 5 * hidden_size, got ", proj.size(2));
  TORCH_CHECK(proj.is_contiguous(), kWho, "proj must be contiguous (call .contiguous() first); got strides ",
              proj.strides());
  return {proj.size(0), proj.size(1), proj.size(2) / 5};
}

// The operand dtype of a packed pair: float32, or the activation dtype itself (native bfloat16).
at::ScalarType operand_dtype(const Tensor& packed, at::ScalarType dtype) {
  TORCH_CHECK(packed.defined(), kWho, "a packed weight is missing");
  const at::ScalarType e = packed.scalar_type();
  TORCH_CHECK(e == at::kFloat || (e == at::kBFloat16 && dtype == at::kBFloat16), kWho,
              "packed weights must be float32, or bfloat16 for bfloat16 activations; got ", e, " for ", dtype);
  return e;
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

// ------------------------------------------------------------------------------------------------
// Forward.

template <typename D, typename E>
void forward_loop(const Tensor& proj, const Tensor& packed_hh, const Tensor& packed_hm, const Tensor& h0,
                  Tensor& c, const Tensor& lengths, Tensor& output, Tensor& cell_states, Tensor& act,
                  bool save_for_backward, bool keep_cells) {
  const int64_t T = proj.size(0), B = proj.size(1), H = proj.size(2) / 5;
  const auto& k = kernels<D, E>();
  const bool native = !std::is_same_v<E, float>;
  const PackedView<E> w_hm{packed_hm.data_ptr<E>(), packing_of(H, H, false, native)};
  const PackedView<E> w_hh{packed_hh.data_ptr<E>(), packing_of(kGates * H, H, true, native)};
  // The GEMM operands: h (the running state, rounded to D) and m, in private buffers.
  const auto e_options = proj.options().dtype(c10::CppTypeToScalarType<E>::value);
  Tensor h = h0.to(proj.scalar_type()).to(c10::CppTypeToScalarType<E>::value, /*non_blocking=*/false, /*copy=*/true);
  Tensor m = at::empty({B, H}, e_options);
  E* h_p = h.data_ptr<E>();
  E* m_p = m.data_ptr<E>();
  float* c_p = c.data_ptr<float>();
  const D* proj_p = proj.data_ptr<D>();
  D* out_p = output.data_ptr<D>();
  float* cells_p = keep_cells ? cell_states.data_ptr<float>() : nullptr;
  D* act_p = save_for_backward ? act.data_ptr<D>() : nullptr;
  const int64_t* len_p = ptr_or_null<int64_t>(lengths);
  // Inference skips the rows past the last running one (featurize sorts texts longest first).
  // Training computes every row: the saved gates of padded rows are part of the contract.
  const std::vector<int64_t> rows = save_for_backward ? std::vector<int64_t>(T, B) : rows_to_compute(lengths, T, B);
  std::vector<float> tiles = tile_buffers();

  for (int64_t t = 0; t < T; ++t) {
    const int64_t M = rows[t];
    const D* proj_t = proj_p + t * B * 5 * H;
    D* out_t = out_p + t * B * H;
    float* cell_t = cells_p != nullptr ? cells_p + t * B * H : nullptr;
    D* act_t = act_p != nullptr ? act_p + t * B * 6 * H : nullptr;
    if (M < B) {
      k.carry_state(B - M, H, h_p + M * H, H, c_p + M * H, H, out_t + M * H, H,
                    cell_t != nullptr ? cell_t + M * H : nullptr, H);
    }
    if (M == 0) {
      continue;
    }
    const D* proj_next = t + 1 < T ? proj_t + B * 5 * H : nullptr;
    gemm_pass<E>(M, h_p, H, w_hm, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, const float* tile) {
      const int64_t n0 = j * w_hm.p.units;
      const int64_t width = block_width(w_hm.p, j);
      // The gate columns of these units, which the second pass reads.
      for (int64_t g = 0; g < kGates; ++g) {
        prefetch_block(proj_t + row0 * 5 * H + g * H + n0, n_rows, width, 5 * H);
      }
      k.forward_m(n_rows, width, H, tile, kColumnBlock, proj_t + row0 * 5 * H + n0, 5 * H, m_p + row0 * H + n0, H,
                  act_t != nullptr ? act_t + row0 * 6 * H + n0 : nullptr, 6 * H);
    });
    gemm_pass<E>(M, m_p, H, w_hh, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, const float* tile) {
      const int64_t n0 = j * w_hh.p.units;
      if (proj_next != nullptr) {  // the xm columns of these units, which the next step's first pass reads
        prefetch_block(proj_next + row0 * 5 * H + 4 * H + n0, n_rows, block_units(w_hh.p, j), 5 * H);
      }
      k.forward_cell(n_rows, block_units(w_hh.p, j), H, tile, kColumnBlock, proj_t + row0 * 5 * H + n0, 5 * H,
                     h_p + row0 * H + n0, H, c_p + row0 * H + n0, H, out_t + row0 * H + n0, H,
                     cell_t != nullptr ? cell_t + row0 * H + n0 : nullptr, H,
                     act_t != nullptr ? act_t + row0 * 6 * H + n0 : nullptr, 6 * H,
                     len_p != nullptr ? len_p + row0 : nullptr, t);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& proj, const Tensor& packed_hh,
                                                   const Tensor& packed_hm, const Tensor& h0, const Tensor& c0,
                                                   const std::optional<Tensor>& lengths, bool save_for_backward,
                                                   bool return_cell_states, bool poison_buffers) {
  const auto [T, B, H] = check_proj(proj);
  const at::ScalarType dtype = proj.scalar_type();
  const at::ScalarType e = operand_dtype(packed_hh, dtype);
  check_packed(packed_hh, "packed_hh", e, kGates * H, H, true);
  check_packed(packed_hm, "packed_hm", e, H, H, false);
  check_input(h0, "h0", at::kFloat, {B, H});
  check_input(c0, "c0", at::kFloat, {B, H});
  check_optional(lengths, "lengths", at::kLong, {B});

  const auto options = proj.options();
  const auto f32 = options.dtype(at::kFloat);
  const bool keep_cells = save_for_backward || return_cell_states;
  Tensor output = new_buffer({T, B, H}, options, poison_buffers);
  Tensor cell_states = keep_cells ? new_buffer({T, B, H}, f32, poison_buffers) : at::empty({0}, f32);
  Tensor act = save_for_backward ? new_buffer({T, B, 6 * H}, options, poison_buffers) : at::empty({0}, options);
  Tensor c = c0.clone();
  const Tensor len = value_or_undefined(lengths);

  if (dtype == at::kFloat) {
    forward_loop<float, float>(proj, packed_hh, packed_hm, h0, c, len, output, cell_states, act, save_for_backward,
                               keep_cells);
  } else if (dtype == at::kBFloat16 && e == at::kBFloat16) {
    forward_loop<BFloat16, BFloat16>(proj, packed_hh, packed_hm, h0, c, len, output, cell_states, act,
                                     save_for_backward, keep_cells);
  } else if (dtype == at::kBFloat16) {
    forward_loop<BFloat16, float>(proj, packed_hh, packed_hm, h0, c, len, output, cell_states, act,
                                  save_for_backward, keep_cells);
  } else {
    forward_loop<Half, float>(proj, packed_hh, packed_hm, h0, c, len, output, cell_states, act, save_for_backward,
                              keep_cells);
  }
  return {output, c, cell_states, act};
}

// ------------------------------------------------------------------------------------------------
// Backward.

template <typename D, typename E>
void backward_loop(const Tensor& grad_output, const Tensor& grad_cells, const Tensor& packed_hh_t,
                   const Tensor& packed_hm_t, const Tensor& c0, const Tensor& lengths, const Tensor& cell_states,
                   const Tensor& act, Tensor& grad_proj, Tensor& grad_hm, Tensor& grad_h0, Tensor& dh, Tensor& dc) {
  const int64_t T = act.size(0), B = act.size(1), H = act.size(2) / 6;
  const auto& k = kernels<D, E>();
  const bool native = !std::is_same_v<E, float>;
  // Wmh^T [H, H] and Wh^T [H, 4H], both plain: rec = dhm Wmh, dm = dz Wh.
  const PackedView<E> w_rec{packed_hm_t.data_ptr<E>(), packing_of(H, H, false, native)};
  const PackedView<E> w_dm{packed_hh_t.data_ptr<E>(), packing_of(H, kGates * H, false, native)};
  const auto e_options = act.options().dtype(c10::CppTypeToScalarType<E>::value);
  Tensor dz_op = at::empty({B, kGates * H}, e_options);
  Tensor dhm_op = at::empty({B, H}, e_options);
  E* dz_p = dz_op.data_ptr<E>();
  E* dhm_p = dhm_op.data_ptr<E>();
  float* dh_p = dh.data_ptr<float>();
  float* dc_p = dc.data_ptr<float>();
  const D* gout_p = ptr_or_null<D>(grad_output);
  const float* gcells_p = ptr_or_null<float>(grad_cells);
  const D* act_p = act.data_ptr<D>();
  const float* cells_p = cell_states.data_ptr<float>();
  const float* c0_p = c0.data_ptr<float>();
  D* dproj_p = grad_proj.data_ptr<D>();
  D* ghm_p = grad_hm.data_ptr<D>();
  const int64_t* len_p = ptr_or_null<int64_t>(lengths);
  std::vector<float> tiles = tile_buffers();

  for (int64_t t = T - 1; t >= 0; --t) {
    const bool has_rec = t < T - 1;
    const D* act_t = act_p + t * B * 6 * H;
    const float* cell_t = cells_p + t * B * H;
    const float* cell_prev = t > 0 ? cells_p + (t - 1) * B * H : c0_p;
    const D* gout_t = gout_p != nullptr ? gout_p + t * B * H : nullptr;
    const float* gcells_t = gcells_p != nullptr ? gcells_p + t * B * H : nullptr;
    D* dproj_t = dproj_p + t * B * 5 * H;
    gemm_pass<E>(B, has_rec ? dhm_p : nullptr, H, w_rec, tiles,
                 [&](int64_t j, int64_t row0, int64_t n_rows, const float* tile) {
                   const int64_t n0 = j * w_rec.p.units;
                   const int64_t at = row0 * H + n0;
                   k.backward_cell(n_rows, block_width(w_rec.p, j), H, tile, kColumnBlock, dh_p + at, dc_p + at, H,
                                   gout_t != nullptr ? gout_t + at : nullptr, H,
                                   gcells_t != nullptr ? gcells_t + at : nullptr, H, act_t + row0 * 6 * H + n0, 6 * H,
                                   cell_t + at, cell_prev + at, H, dproj_t + row0 * 5 * H + n0, 5 * H,
                                   dz_p + row0 * kGates * H + n0, kGates * H,
                                   len_p != nullptr ? len_p + row0 : nullptr, t);
                 });
    gemm_pass<E>(B, dz_p, kGates * H, w_dm, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, const float* tile) {
      const int64_t n0 = j * w_dm.p.units;
      k.backward_m(n_rows, block_width(w_dm.p, j), H, tile, kColumnBlock, act_t + row0 * 6 * H + n0, 6 * H,
                   dproj_t + row0 * 5 * H + n0, 5 * H, ghm_p + t * B * H + row0 * H + n0, H,
                   dhm_p + row0 * H + n0, H);
    });
  }
  // The gradient of h0 is one more recurrent product, dhm_0 Wmh, plus (lengths) what rows that never
  // started passed straight through.
  if (T > 0) {
    float* gh0_p = grad_h0.data_ptr<float>();
    gemm_pass<E>(B, dhm_p, H, w_rec, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, const float* tile) {
      const int64_t at = row0 * H + j * w_rec.p.units;
      k.grad_h0(n_rows, block_width(w_rec.p, j), tile, kColumnBlock, dh_p + at, H, gh0_p + at, H,
                len_p != nullptr ? len_p + row0 : nullptr);
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& packed_hh_t, const Tensor& packed_hm_t,
    const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output,
    const Tensor& cell_states, const Tensor& act, bool poison_buffers) {
  TORCH_CHECK(output.defined() && output.device().is_cpu(), kWho, "output must be a CPU tensor");
  TORCH_CHECK(output.dim() == 3, kWho, "output must be 3-D [T, B, H], got shape ", output.sizes());
  TORCH_CHECK(is_activation_dtype(output.scalar_type()), kWho, "output must be float32, float16 or bfloat16, got ",
              output.scalar_type());
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  TORCH_CHECK(H > 0 && B > 0, kWho, "output must have B > 0 rows and H > 0 units, got shape ", output.sizes());
  const at::ScalarType dtype = output.scalar_type();
  check_input(output, "output", dtype, {T, B, H});
  TORCH_CHECK(act.dim() == 3 && cell_states.dim() == 3, kWho,
              "act and cell_states must be the [T, B, 6H] and [T, B, H] tensors saved by "
              "forward(save_for_backward=True), got shapes ",
              act.sizes(), " and ", cell_states.sizes());
  check_input(act, "act", dtype, {T, B, 6 * H});
  check_input(cell_states, "cell_states", at::kFloat, {T, B, H});
  const at::ScalarType e = operand_dtype(packed_hh_t, dtype);
  check_packed(packed_hh_t, "packed_hh_t", e, H, kGates * H, false);
  check_packed(packed_hm_t, "packed_hm_t", e, H, H, false);
  check_input(h0, "h0", at::kFloat, {B, H});
  check_input(c0, "c0", at::kFloat, {B, H});
  check_optional(grad_output, "grad_output", dtype, {T, B, H});
  check_optional(grad_c_n, "grad_c_n", at::kFloat, {B, H});
  check_optional(grad_cell_states, "grad_cell_states", at::kFloat, {T, B, H});
  check_optional(lengths, "lengths", at::kLong, {B});

  const auto options = output.options();
  const auto f32 = options.dtype(at::kFloat);
  Tensor grad_proj = new_buffer({T, B, 5 * H}, options, poison_buffers);
  Tensor grad_hm = new_buffer({T, B, H}, options, poison_buffers);
  Tensor grad_h0 = T > 0 ? new_buffer({B, H}, f32, poison_buffers) : at::zeros({B, H}, f32);
  // dh carries the full gradient that reached h_{t+1}; dc the one of c_t. dc ends as grad_c0.
  Tensor dh = at::zeros({B, H}, f32);
  const Tensor grad_c_n_ = value_or_undefined(grad_c_n);
  Tensor dc = grad_c_n_.defined() ? grad_c_n_.clone() : at::zeros({B, H}, f32);
  const Tensor gout = value_or_undefined(grad_output);
  const Tensor gcells = value_or_undefined(grad_cell_states);
  const Tensor len = value_or_undefined(lengths);

  if (dtype == at::kFloat) {
    backward_loop<float, float>(gout, gcells, packed_hh_t, packed_hm_t, c0, len, cell_states, act, grad_proj,
                                grad_hm, grad_h0, dh, dc);
  } else if (dtype == at::kBFloat16 && e == at::kBFloat16) {
    backward_loop<BFloat16, BFloat16>(gout, gcells, packed_hh_t, packed_hm_t, c0, len, cell_states, act, grad_proj,
                                      grad_hm, grad_h0, dh, dc);
  } else if (dtype == at::kBFloat16) {
    backward_loop<BFloat16, float>(gout, gcells, packed_hh_t, packed_hm_t, c0, len, cell_states, act, grad_proj,
                                   grad_hm, grad_h0, dh, dc);
  } else {
    backward_loop<Half, float>(gout, gcells, packed_hh_t, packed_hm_t, c0, len, cell_states, act, grad_proj,
                               grad_hm, grad_h0, dh, dc);
  }
  return {grad_proj, grad_hm, grad_h0, dc};
}

// ------------------------------------------------------------------------------------------------
// Weight gradients: dWh = sum_t dz_t^T m_t (m_t = xm_t * hm_t recomputed from act) and
// dWmh = sum_t dhm_t^T h_{t-1}, as GEMMs over all T*B rows, accumulated in float32.
//
// float32 and native 16-bit GEMMs (where ATen multiplies 16-bit matrices with float32 accumulation
// at full speed) use at::mm in the activation dtype, as the reference does. Elsewhere ATen's 16-bit
// GEMM is a slow portable loop, so the products go to MKL's mixed-precision GEMM (16-bit operands,
// float32 result) when this PyTorch carries MKL, else to float32 copies of the operands.

using MixedGemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                           int lda, const void* b, int ldb, float beta, float* c, int ldc);

MixedGemm mkl_mixed_gemm(at::ScalarType dtype) {
  static const MixedGemm bf16 = reinterpret_cast<MixedGemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  static const MixedGemm f16 = reinterpret_cast<MixedGemm>(dlsym(RTLD_DEFAULT, "cblas_gemm_f16f16f32"));
  return dtype == at::kBFloat16 ? bf16 : f16;
}

bool fits_int(std::initializer_list<int64_t> values) {
  for (const int64_t v : values) {
    if (v > std::numeric_limits<int>::max()) {
      return false;
    }
  }
  return true;
}

// out (float32) += a^T b for a [R, M] (row stride lda) and b [R, N] (row stride ldb), both dtype.
void mixed_gemm_tn(const Tensor& a, const Tensor& b, Tensor& out, bool accumulate) {
  const int64_t R = a.size(0), M = a.size(1), N = b.size(1);
  const MixedGemm gemm = mkl_mixed_gemm(a.scalar_type());
  if (gemm != nullptr && a.stride(1) == 1 && b.stride(1) == 1 && fits_int({R, M, N, a.stride(0), b.stride(0)})) {
    constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
    gemm(kRowMajor, kTrans, kNoTrans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(R), 1.0f,
         a.data_ptr(), static_cast<int>(a.stride(0)), b.data_ptr(), static_cast<int>(b.stride(0)),
         accumulate ? 1.0f : 0.0f, out.data_ptr<float>(), static_cast<int>(N));
    return;
  }
  if (accumulate) {
    out.addmm_(a.t().to(at::kFloat), b.to(at::kFloat));
  } else {
    at::mm_out(out, a.t().to(at::kFloat), b.to(at::kFloat));
  }
}

std::tuple<Tensor, Tensor> weight_grads(const Tensor& grad_proj, const Tensor& grad_hm, const Tensor& act,
                                        const Tensor& output, const Tensor& h0, bool native_16bit) {
  TORCH_CHECK(output.defined() && output.dim() == 3, kWho, "output must be 3-D [T, B, H]");
  const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
  const at::ScalarType dtype = output.scalar_type();
  TORCH_CHECK(is_activation_dtype(dtype), kWho, "output must be float32, float16 or bfloat16, got ", dtype);
  check_input(output, "output", dtype, {T, B, H});
  check_input(grad_proj, "grad_proj", dtype, {T, B, 5 * H});
  check_input(grad_hm, "grad_hm", dtype, {T, B, H});
  check_input(act, "act", dtype, {T, B, 6 * H});
  check_input(h0, "h0", at::kFloat, {B, H});
  const auto options = output.options();
  if (T == 0) {
    return {at::zeros({kGates * H, H}, options), at::zeros({H, H}, options)};
  }
  const Tensor dz = grad_proj.view({T * B, 5 * H}).narrow(1, 0, kGates * H);
  const Tensor dhm = grad_hm.view({T * B, H});
  const Tensor h_prev = output.view({T * B, H}).narrow(0, 0, (T - 1) * B);
  const int64_t R = T * B;
  if (dtype == at::kFloat || native_16bit) {
    Tensor m = at::empty({R, H}, options);
    if (dtype == at::kFloat) {
      recompute_m_kernel<float, float>()(R, H, act.data_ptr<float>(), m.data_ptr<float>());
    } else if (dtype == at::kBFloat16) {
      recompute_m_kernel<BFloat16, BFloat16>()(R, H, act.data_ptr<BFloat16>(), m.data_ptr<BFloat16>());
    } else {
      recompute_m_kernel<Half, Half>()(R, H, act.data_ptr<Half>(), m.data_ptr<Half>());
    }
    Tensor grad_weight_hh = at::mm(dz.t(), m);
    Tensor grad_weight_hm = at::mm(dhm.narrow(0, 0, B).t(), h0.to(dtype));
    if (T > 1) {
      grad_weight_hm.addmm_(dhm.narrow(0, B, R - B).t(), h_prev);
    }
    return {grad_weight_hh, grad_weight_hm};
  }
  Tensor m = at::empty({R, H}, options);
  if (dtype == at::kBFloat16) {
    recompute_m_kernel<BFloat16, BFloat16>()(R, H, act.data_ptr<BFloat16>(), m.data_ptr<BFloat16>());
  } else {
    recompute_m_kernel<Half, Half>()(R, H, act.data_ptr<Half>(), m.data_ptr<Half>());
  }
  const auto f32 = options.dtype(at::kFloat);
  Tensor gw_hh = at::empty({kGates * H, H}, f32);
  Tensor gw_hm = at::empty({H, H}, f32);
  mixed_gemm_tn(dz, m, gw_hh, false);
  mixed_gemm_tn(dhm.narrow(0, 0, B), h0.to(dtype), gw_hm, false);
  if (T > 1) {
    mixed_gemm_tn(dhm.narrow(0, B, R - B), h_prev, gw_hm, true);
  }
  return {gw_hh.to(dtype), gw_hm.to(dtype)};
}

// ------------------------------------------------------------------------------------------------
// Odds and ends the Python layer asks for.

int64_t fingerprint(const Tensor& tensor) {
  TORCH_CHECK(tensor.defined() && tensor.device().is_cpu(), kWho, "fingerprint expects a CPU tensor");
  TORCH_CHECK(tensor.is_contiguous(), kWho, "fingerprint expects a contiguous tensor");
  const auto* data = static_cast<const unsigned char*>(tensor.data_ptr());
  const int64_t bytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
  // Fixed 4 MiB pieces hashed in parallel, then combined in order: the value does not depend on the
  // number of threads.
  constexpr int64_t kPiece = int64_t(4) << 20;
  const int64_t pieces = std::max<int64_t>(1, ceil_div(bytes, kPiece));
  std::vector<uint64_t> hashes(pieces);
  const Fingerprint hash = fingerprint_kernel();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t start = i * kPiece;
      hashes[i] = hash(data + start, std::min(kPiece, bytes - start));
    }
  });
  const uint64_t combined = pieces == 1 ? hashes[0] : hash(hashes.data(), pieces * sizeof(uint64_t));
  int64_t out;
  std::memcpy(&out, &combined, sizeof(out));
  return out;
}

std::string kernel_isa() { return use_avx2() ? "avx2" : "default"; }

// Whether the bfloat16 GEMM on VNNI-packed weights runs here and gives the float32 products of the
// same numbers (checked on a small problem with awkward sizes; any exception means no).
bool native_bf16_gemm_works() {
  try {
    const int64_t M = 5, N = 2 * kColumnBlock + 24, K = 96;
    const Tensor a = at::randn({M, K}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
    const Tensor w = at::randn({N, K}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
    const Tensor packed = pack_weight(w, false, true);
    const PackedView<BFloat16> view{packed.data_ptr<BFloat16>(), packing_of(N, K, false, true)};
    Tensor out = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
    std::vector<float> tiles = tile_buffers();
    gemm_pass<BFloat16>(M, a.data_ptr<BFloat16>(), K, view, tiles,
                        [&](int64_t j, int64_t row0, int64_t rows, const float* tile) {
                          const int64_t width = block_width(view.p, j);
                          for (int64_t r = 0; r < rows; ++r) {
                            std::memcpy(out.data_ptr<float>() + (row0 + r) * N + j * kColumnBlock,
                                        tile + r * kColumnBlock, width * sizeof(float));
                          }
                        });
    const Tensor expected = at::mm(a.to(at::kFloat), w.to(at::kFloat).t());
    return out.sub(expected).abs().max().item<float>() <= 1e-4f * (1.0f + expected.abs().max().item<float>());
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastmlstm

// The namespace is fixed: the build on first use and the ahead-of-time build register the same
// operators, and only one of them is ever loaded into a process.
TORCH_LIBRARY(fastmlstm_cpu, m) {
  m.def("pack_weight(Tensor weight, bool gates, bool native) -> Tensor");
  m.def(
      "forward(Tensor proj, Tensor packed_hh, Tensor packed_hm, Tensor h0, Tensor c0, Tensor? lengths, "
      "bool save_for_backward, bool return_cell_states, bool poison_buffers=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor? grad_output, Tensor? grad_c_n, Tensor? grad_cell_states, Tensor packed_hh_t, "
      "Tensor packed_hm_t, Tensor h0, Tensor c0, Tensor? lengths, Tensor output, Tensor cell_states, Tensor act, "
      "bool poison_buffers=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "weight_grads(Tensor grad_proj, Tensor grad_hm, Tensor act, Tensor output, Tensor h0, bool native_16bit) "
      "-> (Tensor, Tensor)");
  m.def("fingerprint(Tensor tensor) -> int");
  m.def("kernel_isa() -> str", &fastmlstm::cpu::kernel_isa);
  m.def("native_bf16_gemm_works() -> bool", &fastmlstm::cpu::native_bf16_gemm_works);
}

// One kernel for every backend key, so that a tensor on another device reaches the checks above and
// gets their message instead of the dispatcher's.
TORCH_LIBRARY_IMPL(fastmlstm_cpu, CompositeExplicitAutograd, m) {
  m.impl("pack_weight", &fastmlstm::cpu::pack_weight);
  m.impl("forward", &fastmlstm::cpu::forward);
  m.impl("backward", &fastmlstm::cpu::backward);
  m.impl("weight_grads", &fastmlstm::cpu::weight_grads);
  m.impl("fingerprint", &fastmlstm::cpu::fingerprint);
}
