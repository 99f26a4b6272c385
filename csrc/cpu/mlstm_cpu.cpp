// Host driver of the CPU backend: input checks, weight packing, the time loops with their GEMMs and
// fused epilogues, and the operator registration (torch.ops.fastmlstm_cpu.*).
//
// Legend: T time, B batch rows, H hidden units, I input features, G = 4 gates (i, f, o, u); D the
// activation dtype, E the GEMM operand dtype (mlstm_cpu.h). The contract, shapes and numerics are
// those of fastmlstm/ops/common.py; the order of operations follows fastmlstm/ops/reference.py.
//
// Per forward step, two GEMMs that depend on each other, each run as one pass over column blocks
// of a packed weight (at::parallel_for over blocks, the blocks' rows in tiles of at most kRowBlock):
//   hm = h_{t-1} Wmh^T  -> per tile, forward_m:    m = xm * hm (and save xm, hm)
//   z  = m Wh^T         -> per tile, forward_cell: gates, c_t, h_t, lengths mask (Wh's rows are
//                          permuted so that one tile holds the four gates of 8 hidden units)
// Per backward step, mirrored:
//   rec = dhm_{t+1} Wmh -> per tile, backward_cell: dh_t, dz_t, dc_{t-1}
//   dm  = dz_t Wh       -> per tile, backward_m:    dxm_t, dhm_t
// A tile's epilogue runs right after its GEMM, while the tile is in L1: z, hm, rec and dm never
// exist as [B, 4H] or [B, H] arrays. The gradients summed over time are GEMMs over chunks of steps.
//
// Two sources of input projections: proj [T, B, 5H] (the contract of fastmlstm/ops/common.py, for
// the byte model's table-gathered inputs), or x [T, B, I] with the input weights, whose products
// x_t Wx^T and x_t Wmx^T are two more tile GEMMs per step (forward_input / backward_input, used by
// fastmlstm.multiplicative_lstm): no [T, B, 5H] tensor is ever allocated, written or read back.
//
// The tile GEMMs are at::native::cpublas::brgemm (oneDNN's batch-reduce GEMM micro-kernels where
// oneDNN supports the CPU, else ATen's gemm) on weights packed once per weight
// (fastmlstm/ops/cpu/recurrence.py keeps the packed copies while a weight is unchanged): float32
// blocks [K, 32] in general, VNNI-packed bfloat16 blocks where the CPU multiplies bfloat16 natively.
// Every GEMM accumulates in float32 and writes a float32 tile. A row's result never depends on T,
// on which rows are computed with it, or on the thread count, so a chunked run repeats the one-shot
// run bit for bit.

#include "mlstm_cpu.h"

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
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
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

template <typename D>
RecomputeM<D> recompute_m_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::recompute_m<D>();
  }
#endif
  return isa_default::recompute_m<D>();
}

template <typename D>
Widen<D> widen_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::widen<D>();
  }
#endif
  return isa_default::widen<D>();
}

template <typename W>
SmallGemm<W> small_gemm_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::small_gemm<W>();
  }
#endif
  return isa_default::small_gemm<W>();
}

VnniGemm vnni_gemm_kernel() {
#ifdef FASTMLSTM_HAVE_AVX2_KERNELS
  if (use_avx2()) {
    return isa_avx2::vnni_gemm();
  }
#endif
  return isa_default::vnni_gemm();
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

Tensor defined_or_undefined(const std::optional<Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? *tensor : Tensor();
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
// of kColumnBlock (32) output columns each, zero-padded, in one of three layouts:
//   kFloat32  float32 [blocks, K, 32]         block j, row k, column c = W[row(j, c), k]; oneDNN's
//                                             float32 micro-kernels (any input dtype, widened exactly)
//   kVnni     bfloat16 [blocks, K/2, 32, 2]   the same with pairs of consecutive k interleaved, for
//                                             the CPU's native bfloat16 micro-kernels
//   kNarrow   16-bit [blocks, K, 32]          the float32 layout in the weight's own 16-bit dtype, for
//                                             small batches (small_gemm): half the bytes to read
// row(j, c) is j * 32 + c for a plain weight. For the gate weight Wh [4H, H] ("gates") a block
// holds q = 8 hidden units and its columns are [i(q) f(q) o(q) u(q)]: row(j, c) = g * H + j * q + c'
// with g = c / q_j, c' = c % q_j (the last block has q_j = H - j * q units).

enum Layout : int64_t { kFloat32 = 0, kVnni = 1, kNarrow = 2 };

struct Packing {
  int64_t N, K, blocks, units;  // units: output columns (plain) or hidden units (gates) per block
  bool gates;
  Layout layout;
};

Packing packing_of(int64_t N, int64_t K, bool gates, Layout layout) {
  const int64_t units = gates ? kColumnBlock / kGates : kColumnBlock;
  const int64_t outputs = gates ? N / kGates : N;
  return {N, K, ceil_div(outputs, units), units, gates, layout};
}

int64_t block_units(const Packing& p, int64_t j) {
  const int64_t outputs = p.gates ? p.N / kGates : p.N;
  return std::min(p.units, outputs - j * p.units);
}

// Output columns of block j.
int64_t block_width(const Packing& p, int64_t j) {
  return p.gates ? kGates * block_units(p, j) : block_units(p, j);
}

// The weight row that column c of block j reads.
int64_t source_row(const Packing& p, int64_t j, int64_t c) {
  if (!p.gates) {
    return j * p.units + c;
  }
  const int64_t units = block_units(p, j);
  const int64_t hidden = p.N / kGates;
  return (c / units) * hidden + j * p.units + c % units;
}

// The matrix a pack reads: weight [N, K]; or [weight | second] (K = K1 + K2, concatenated along
// the input axis); or weight^T (N and K swapped), read without copying.
template <typename In>
struct Source {
  const In* first;
  const In* second;  // or null
  int64_t k_first;   // columns of first (ld of first); second has K - k_first (its ld)
  bool transposed;   // element (n, k) at first[k * ld + n], ld = N
  int64_t N;
};

// Where element (k, c) of a block goes: [K, 32], or [K/2, 32, 2] (VNNI: pairs of consecutive k
// side by side). Every pack writes through this one function, whatever it reads.
inline int64_t packed_index(const Packing& p, int64_t k, int64_t c) {
  return p.layout == kVnni ? (k / 2) * kColumnBlock * 2 + c * 2 + (k % 2) : k * kColumnBlock + c;
}

template <typename In, typename Out>
void pack_blocks(const Source<In>& src, Out* out, const Packing& p) {
  const int64_t block_elems = p.K * kColumnBlock;
  const int64_t k_second = p.K - src.k_first;
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Out* block = out + j * block_elems;
      std::fill(block, block + block_elems, Out(0));
      const int64_t width = block_width(p, j);
      if (src.transposed) {
        // Blocks of W^T: row k of the block is W[k, j*32 : j*32 + width], contiguous.
        const int64_t n0 = j * p.units;
        for (int64_t k = 0; k < p.K; ++k) {
          const In* row = src.first + k * src.N + n0;
          for (int64_t c = 0; c < width; ++c) {
            block[packed_index(p, k, c)] = static_cast<Out>(row[c]);
          }
        }
        continue;
      }
      for (int64_t c = 0; c < width; ++c) {
        const int64_t n = source_row(p, j, c);
        const In* row = src.first + n * src.k_first;
        const In* row2 = src.second != nullptr ? src.second + n * k_second : nullptr;
        for (int64_t k = 0; k < p.K; ++k) {
          block[packed_index(p, k, c)] = static_cast<Out>(k < src.k_first ? row[k] : row2[k - src.k_first]);
        }
      }
    }
  });
}

std::vector<int64_t> packed_shape(const Packing& p) {
  if (p.layout == kVnni) {
    return {p.blocks, p.K / 2, kColumnBlock, 2};
  }
  return {p.blocks, p.K, kColumnBlock};
}

// Packs W [N, K] (float32, float16 or bfloat16) in `layout` (a Layout value), where W is `weight`,
// or [weight | input_weight] (concatenated along the input axis: z = [m | x] [Wh | Wx]^T), or, with
// `transposed`, weight^T (for the backward's products with the transposed weights).
Tensor pack_weight(const Tensor& weight, bool gates, int64_t layout, const std::optional<Tensor>& input_weight,
                   bool transposed) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), kWho, "pack_weight expects a CPU tensor");
  TORCH_CHECK(weight.dim() == 2, kWho, "pack_weight expects a 2-D weight [N, K], got shape ", weight.sizes());
  TORCH_CHECK(is_activation_dtype(weight.scalar_type()), kWho,
              "pack_weight expects float32, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(layout == kFloat32 || layout == kVnni || layout == kNarrow, kWho, "unknown packing layout ", layout);
  const Tensor second = defined_or_undefined(input_weight);
  TORCH_CHECK(!(second.defined() && transposed), kWho, "pack_weight: transposed takes one weight");
  if (second.defined()) {
    TORCH_CHECK(second.device().is_cpu() && second.dim() == 2 && second.size(0) == weight.size(0) &&
                    second.scalar_type() == weight.scalar_type(),
                kWho, "pack_weight: input_weight must be a CPU [", weight.size(0), ", I] tensor of dtype ",
                weight.scalar_type(), ", got ", second.scalar_type(), " ", second.sizes());
  }
  const int64_t N = transposed ? weight.size(1) : weight.size(0);
  const int64_t K = (transposed ? weight.size(0) : weight.size(1)) + (second.defined() ? second.size(1) : 0);
  TORCH_CHECK(N > 0 && K > 0, kWho, "pack_weight expects a non-empty weight, got shape ", weight.sizes());
  TORCH_CHECK(!gates || (N % kGates == 0 && !transposed), kWho,
              "a gate weight must have 4 * hidden_size rows (and not be transposed), got ", N);
  TORCH_CHECK(layout != kVnni || (weight.scalar_type() == at::kBFloat16 && K % 2 == 0), kWho,
              "the VNNI layout takes a bfloat16 weight with an even number of columns, got ", weight.scalar_type(),
              " with ", K);
  TORCH_CHECK(layout != kNarrow || weight.scalar_type() != at::kFloat, kWho,
              "the narrow layout keeps a 16-bit weight's dtype; got a float32 weight");
  const Tensor w = weight.contiguous();
  const Tensor w2 = second.defined() ? second.contiguous() : Tensor();
  const Packing p = packing_of(N, K, gates, static_cast<Layout>(layout));
  const auto out_dtype = layout == kFloat32 ? at::kFloat : weight.scalar_type();
  Tensor out = at::empty(packed_shape(p), weight.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fastmlstm_cpu_pack", [&] {
    const Source<scalar_t> src{w.data_ptr<scalar_t>(), w2.defined() ? w2.data_ptr<scalar_t>() : nullptr,
                               transposed ? K : w.size(1), transposed, N};
    if (layout == kFloat32) {
      pack_blocks(src, out.data_ptr<float>(), p);
    } else {
      pack_blocks(src, out.data_ptr<scalar_t>(), p);
    }
  });
  return out;
}

// The layout of a packed tensor, from its dtype and rank, for activations of `dtype`.
Layout layout_of(const Tensor& packed, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(packed.defined() && packed.device().is_cpu(), kWho, name, " must be a CPU tensor");
  TORCH_CHECK(packed.is_contiguous(), kWho, name, " must be contiguous");
  const at::ScalarType w = packed.scalar_type();
  if (w == at::kFloat && packed.dim() == 3) {
    return kFloat32;
  }
  TORCH_CHECK(w == dtype, kWho, name, " must be float32, or ", dtype, " for ", dtype, " activations; got ", w,
              " (pack it with pack_weight for this activation dtype)");
  TORCH_CHECK(packed.dim() == 3 || (packed.dim() == 4 && w == at::kBFloat16), kWho, name,
              " is not a packed weight (shape ", packed.sizes(), ")");
  return packed.dim() == 4 ? kVnni : kNarrow;
}

// The layout a packed tensor must have to serve as the weight [N, K] of the loops.
void check_packed(const Tensor& packed, const char* name, Layout layout, at::ScalarType dtype, int64_t N, int64_t K,
                  bool gates) {
  TORCH_CHECK(layout_of(packed, name, dtype) == layout, kWho, name,
              " must be packed in the same layout as the other weights of the call");
  const Packing p = packing_of(N, K, gates, layout);
  const std::vector<int64_t> shape = packed_shape(p);
  TORCH_CHECK(packed.sizes() == at::IntArrayRef(shape), kWho, name, " must have the packed shape ",
              at::IntArrayRef(shape), " of a [", N, ", ", K, "] weight, got ", packed.sizes());
}

// The dtype of the GEMMs' activation operand for a layout: bfloat16 for the native VNNI layout,
// float32 otherwise.
at::ScalarType operand_dtype(Layout layout) { return layout == kVnni ? at::kBFloat16 : at::kFloat; }

// ------------------------------------------------------------------------------------------------
// Tile GEMMs: C [M, width(j)] (float32, row stride kColumnBlock) (+)= A [M, K] (row stride lda) x block j.

template <typename E>
struct PackedView {
  const void* data = nullptr;
  Packing p{};
  at::ScalarType weight_dtype = at::kFloat;
  bool portable = false;  // VNNI blocks multiplied by the portable twin instead of oneDNN (mlstm_cpu.h)
  template <typename W>
  const W* block(int64_t j) const {
    return static_cast<const W*>(data) + j * p.K * kColumnBlock;
  }
};

template <typename E>
PackedView<E> view_of(const Tensor& packed, int64_t N, int64_t K, bool gates, Layout layout, bool portable) {
  return {packed.data_ptr(), packing_of(N, K, gates, layout), packed.scalar_type(), portable};
}

template <typename E>
void tile_gemm(int64_t M, const E* A, int64_t lda, const PackedView<E>& w, int64_t j, float* C, bool add_C) {
  const int64_t N = block_width(w.p, j);
  if constexpr (std::is_same_v<E, float>) {
    if (w.p.layout == kNarrow) {
      TORCH_INTERNAL_ASSERT(!add_C);
      if (w.weight_dtype == at::kBFloat16) {
        small_gemm_kernel<BFloat16>()(M, N, w.p.K, A, lda, w.template block<BFloat16>(j), C);
      } else {
        small_gemm_kernel<Half>()(M, N, w.p.K, A, lda, w.template block<Half>(j), C);
      }
      return;
    }
    at::native::cpublas::brgemm(M, N, w.p.K, lda, kColumnBlock, kColumnBlock, add_C, A, w.template block<float>(j),
                                C, false);
  } else if (w.portable) {
    vnni_gemm_kernel()(M, N, w.p.K, A, lda, w.template block<BFloat16>(j), C, add_C);
  } else {
    at::native::cpublas::brgemm(M, N, w.p.K, lda, kColumnBlock, kColumnBlock, add_C, A,
                                w.template block<BFloat16>(j), C, true);
  }
}

constexpr int64_t kTileElems = kRowBlock * kColumnBlock;
constexpr int64_t kTilesPerThread = 2;

std::vector<float> tile_buffers() {
  return std::vector<float>(at::get_num_threads() * kTilesPerThread * kTileElems);
}

// body(j, row0, rows, tiles) for every column block j < blocks and row tile of rows [0, M), the
// column blocks spread over threads; tiles: this thread's kTilesPerThread tile buffers.
template <typename E, typename Body>
void for_each_tile(int64_t blocks, int64_t M, std::vector<float>& buffers, const Body& body) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float* tiles = buffers.data() + at::get_thread_num() * kTilesPerThread * kTileElems;
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t row0 = 0; row0 < M; row0 += kRowBlock) {
        body(j, row0, std::min(kRowBlock, M - row0), tiles);
      }
    }
    if constexpr (!std::is_same_v<E, float>) {
      at::native::cpublas::brgemm_release(true);  // AMX tiles, where the GEMMs used them
    }
  });
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


void check_activations(const Tensor& tensor, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK(tensor.defined(), kWho, name, " is missing");
  TORCH_CHECK(tensor.device().is_cpu(), kWho, name, " must be a CPU tensor, got one on ", tensor.device(),
              " (the 'cpu' backend runs on CPU tensors only; use backend='triton' or 'cuda' on a GPU)");
  TORCH_CHECK(is_activation_dtype(tensor.scalar_type()), kWho, name, " must be float32, float16 or bfloat16, got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == dims, kWho, name, " must be ", dims, "-D ", layout, ", got shape ", tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), kWho, name, " must be contiguous (call .contiguous() first); got strides ",
              tensor.strides());
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

// ------------------------------------------------------------------------------------------------
// Forward.

// Where the input projections come from: proj [T, B, 5H] (D), or x [T, B, I] multiplied inside the
// loop. Then the gate GEMM runs on [m_t | x_t] [B, H + I] against [Wh | Wx] packed together (one
// tile GEMM with K = H + I; the bias is added in the epilogue), and xm = x Wmx^T, which does not
// depend on the recurrence, is one GEMM per chunk of steps into a small float32 buffer.
template <typename D, typename E>
struct Inputs {
  const D* proj = nullptr;
  const E* x = nullptr;     // [T, B, I] as E (copied next to m each step)
  Tensor x_f, w_im_t;       // x as float32 [T * B, I] and Wmx^T [I, H] float32, for the xm GEMMs
  int64_t I = 0;
  const D* bias = nullptr;  // [4H] or null
};

struct ForwardState {
  Tensor output, c, cell_states, act;
};

template <typename D, typename E>
void forward_loop(int64_t T, int64_t B, int64_t H, const Inputs<D, E>& in, const Tensor& packed_hh,
                  const Tensor& packed_hm, Layout layout, bool portable, const Tensor& h0, const Tensor& lengths,
                  ForwardState& st, bool save_for_backward, bool keep_cells) {
  const auto& k = kernels<D, E>();
  const bool fused = in.proj == nullptr;
  const int64_t I = fused ? in.I : 0;
  const int64_t ld_m = H + I;  // the gate GEMM's operand: m, then (fused) x_t
  const PackedView<E> w_hm = view_of<E>(packed_hm, H, H, false, layout, portable);
  const PackedView<E> w_hh = view_of<E>(packed_hh, kGates * H, H + I, true, layout, portable);
  // The GEMM operands: h (the running state, rounded to D) and [m | x_t], in private buffers.
  Tensor h = h0.to(st.output.scalar_type()).to(c10::CppTypeToScalarType<E>::value, false, /*copy=*/true);
  Tensor mx = at::empty({B, ld_m}, h.options());
  E* h_p = h.data_ptr<E>();
  E* m_p = mx.data_ptr<E>();
  float* c_p = st.c.data_ptr<float>();
  D* out_p = st.output.data_ptr<D>();
  float* cells_p = keep_cells ? st.cell_states.data_ptr<float>() : nullptr;
  D* act_p = save_for_backward ? st.act.data_ptr<D>() : nullptr;
  const int64_t* len_p = ptr_or_null<int64_t>(lengths);
  // Inference skips the rows past the last running one (featurize sorts texts longest first).
  // Training computes every row: the saved gates of padded rows are part of the contract.
  const std::vector<int64_t> rows = save_for_backward ? std::vector<int64_t>(T, B) : rows_to_compute(lengths, T, B);
  std::vector<float> tiles = tile_buffers();
  // xm for a chunk of steps at a time (fused inputs): [Tc * B, H] float32.
  const int64_t Tc = fused ? std::max<int64_t>(1, std::min<int64_t>(T, 512 / B)) : 0;
  Tensor xm_chunk = fused ? at::empty({Tc * B, H}, st.c.options()) : Tensor();

  for (int64_t t = 0; t < T; ++t) {
    const int64_t M = rows[t];
    const D* proj_t = fused ? nullptr : in.proj + t * B * 5 * H;
    const D* proj_next = !fused && t + 1 < T ? proj_t + B * 5 * H : nullptr;
    D* out_t = out_p + t * B * H;
    float* cell_t = cells_p != nullptr ? cells_p + t * B * H : nullptr;
    D* act_t = act_p != nullptr ? act_p + t * B * 6 * H : nullptr;
    const float* xm_t = nullptr;
    if (fused) {
      if (t % Tc == 0) {
        const int64_t steps = std::min(Tc, T - t);
        Tensor out = xm_chunk.narrow(0, 0, steps * B);
        at::mm_out(out, in.x_f.narrow(0, t * B, steps * B), in.w_im_t);
      }
      xm_t = xm_chunk.data_ptr<float>() + (t % Tc) * B * H;
      const E* x_t = in.x + t * B * I;
      for (int64_t b = 0; b < M; ++b) {
        std::memcpy(m_p + b * ld_m + H, x_t + b * I, I * sizeof(E));
      }
    }
    if (M < B) {
      k.carry_state(B - M, H, h_p + M * H, H, c_p + M * H, H, out_t + M * H, H,
                    cell_t != nullptr ? cell_t + M * H : nullptr, H);
    }
    if (M == 0) {
      continue;
    }
    for_each_tile<E>(w_hm.p.blocks, M, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
      const int64_t n0 = j * w_hm.p.units;
      const int64_t width = block_width(w_hm.p, j);
      tile_gemm(n_rows, h_p + row0 * H, H, w_hm, j, tile, false);
      if (!fused) {
        // The gate columns of these units, which the second pass reads.
        for (int64_t g = 0; g < kGates; ++g) {
          prefetch_block(proj_t + row0 * 5 * H + g * H + n0, n_rows, width, 5 * H);
        }
      }
      k.forward_m(n_rows, width, H, tile, kColumnBlock, fused ? nullptr : proj_t + row0 * 5 * H + n0, 5 * H,
                  fused ? xm_t + row0 * H + n0 : nullptr, H, m_p + row0 * ld_m + n0, ld_m,
                  act_t != nullptr ? act_t + row0 * 6 * H + n0 : nullptr, 6 * H);
    });
    for_each_tile<E>(w_hh.p.blocks, M, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
      const int64_t n0 = j * w_hh.p.units;
      const int64_t units = block_units(w_hh.p, j);
      tile_gemm(n_rows, m_p + row0 * ld_m, ld_m, w_hh, j, tile, false);
      if (proj_next != nullptr) {  // the xm columns of these units, which the next step's first pass reads
        prefetch_block(proj_next + row0 * 5 * H + 4 * H + n0, n_rows, units, 5 * H);
      }
      // Fused inputs: the gate GEMM already holds x Wx^T, the bias is added to every row (row stride 0).
      const D* pre = fused ? (in.bias != nullptr ? in.bias + n0 : nullptr) : proj_t + row0 * 5 * H + n0;
      k.forward_cell(n_rows, units, H, tile, kColumnBlock, pre, fused ? 0 : 5 * H, h_p + row0 * H + n0, H,
                     c_p + row0 * H + n0, H, out_t + row0 * H + n0, H,
                     cell_t != nullptr ? cell_t + row0 * H + n0 : nullptr, H,
                     act_t != nullptr ? act_t + row0 * 6 * H + n0 : nullptr, 6 * H,
                     len_p != nullptr ? len_p + row0 : nullptr, t);
    });
  }
}

ForwardState new_forward_state(int64_t T, int64_t B, int64_t H, const at::TensorOptions& options,
                               const Tensor& c0, bool save_for_backward, bool return_cell_states, bool poison) {
  const auto f32 = options.dtype(at::kFloat);
  const bool keep_cells = save_for_backward || return_cell_states;
  return {new_buffer({T, B, H}, options, poison),
          c0.clone(),
          keep_cells ? new_buffer({T, B, H}, f32, poison) : at::empty({0}, f32),
          save_for_backward ? new_buffer({T, B, 6 * H}, options, poison) : at::empty({0}, options)};
}

// Runs forward_loop<D, E> for the (activation, operand) dtype pair at hand.
template <typename Fn>
void dispatch_dtypes(at::ScalarType dtype, at::ScalarType e, const Fn& fn) {
  if (dtype == at::kFloat) {
    fn(float(), float());
  } else if (dtype == at::kBFloat16 && e == at::kBFloat16) {
    fn(BFloat16(), BFloat16());
  } else if (dtype == at::kBFloat16) {
    fn(BFloat16(), float());
  } else {
    fn(Half(), float());
  }
}

void check_state(const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, int64_t B, int64_t H) {
  check_input(h0, "h0", at::kFloat, {B, H});
  check_input(c0, "c0", at::kFloat, {B, H});
  check_optional(lengths, "lengths", at::kLong, {B});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& proj, const Tensor& packed_hh,
                                                   const Tensor& packed_hm, const Tensor& h0, const Tensor& c0,
                                                   const std::optional<Tensor>& lengths, bool save_for_backward,
                                                   bool return_cell_states, bool poison_buffers,
                                                   bool portable_bf16) {
  check_activations(proj, "proj", 3, "[T, B, 5H]");
  TORCH_CHECK(proj.size(2) > 0 && proj.size(2) % 5 == 0, kWho,
              "proj's last dimension must be 5 * hidden_size, got ", proj.size(2));
  const int64_t T = proj.size(0), B = proj.size(1), H = proj.size(2) / 5;
  const at::ScalarType dtype = proj.scalar_type();
  const Layout layout = layout_of(packed_hh, "packed_hh", dtype);
  const at::ScalarType e = operand_dtype(layout);
  check_packed(packed_hh, "packed_hh", layout, dtype, kGates * H, H, true);
  check_packed(packed_hm, "packed_hm", layout, dtype, H, H, false);
  check_state(h0, c0, lengths, B, H);
  ForwardState st = new_forward_state(T, B, H, proj.options(), c0, save_for_backward, return_cell_states,
                                      poison_buffers);
  const Tensor len = defined_or_undefined(lengths);
  dispatch_dtypes(dtype, e, [&](auto d, auto e_) {
    using D = decltype(d);
    using E = decltype(e_);
    Inputs<D, E> in;
    in.proj = proj.data_ptr<D>();
    forward_loop<D, E>(T, B, H, in, packed_hh, packed_hm, layout, portable_bf16, h0, len, st, save_for_backward,
                       save_for_backward || return_cell_states);
  });
  return {st.output, st.c, st.cell_states, st.act};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_input(
    const Tensor& x, const Tensor& weight_im_t, const std::optional<Tensor>& bias, const Tensor& packed_hh_ih,
    const Tensor& packed_hm, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    bool save_for_backward, bool return_cell_states, bool poison_buffers, bool portable_bf16) {
  check_activations(x, "x", 3, "[T, B, I]");
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(I > 0, kWho, "x must have at least one feature, got shape ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(weight_im_t.defined() && weight_im_t.dim() == 2, kWho, "weight_im_t must be a [I, H] tensor");
  const int64_t H = weight_im_t.size(1);
  TORCH_CHECK(H > 0, kWho, "hidden_size must be positive");
  check_input(weight_im_t, "weight_im_t (W_im^T, float32)", at::kFloat, {I, H});
  const Layout layout = layout_of(packed_hh_ih, "packed_hh_ih", dtype);
  const at::ScalarType e = operand_dtype(layout);
  check_packed(packed_hh_ih, "packed_hh_ih", layout, dtype, kGates * H, H + I, true);
  check_packed(packed_hm, "packed_hm", layout, dtype, H, H, false);
  check_optional(bias, "bias", dtype, {kGates * H});
  check_state(h0, c0, lengths, B, H);
  ForwardState st = new_forward_state(T, B, H, x.options(), c0, save_for_backward, return_cell_states,
                                      poison_buffers);
  const Tensor len = defined_or_undefined(lengths);
  const Tensor b = defined_or_undefined(bias);
  dispatch_dtypes(dtype, e, [&](auto d, auto e_) {
    using D = decltype(d);
    using E = decltype(e_);
    // x as float32 for the xm GEMMs (exact), and as the gate GEMM's operand dtype (the same tensor
    // unless the GEMMs multiply bfloat16 natively).
    const Tensor x_f = x.to(at::kFloat).reshape({T * B, I});
    const Tensor x_e = std::is_same_v<E, float> ? x_f : as_operand<E>(x);
    Inputs<D, E> in;
    in.x = x_e.data_ptr<E>();
    in.x_f = x_f;
    in.w_im_t = weight_im_t;
    in.I = I;
    in.bias = ptr_or_null<D>(b);
    forward_loop<D, E>(T, B, H, in, packed_hh_ih, packed_hm, layout, portable_bf16, h0, len, st,
                       save_for_backward, save_for_backward || return_cell_states);
  });
  return {st.output, st.c, st.cell_states, st.act};
}

// ------------------------------------------------------------------------------------------------
// Backward.
//
// The time loop mirrors the forward's two passes per step. The gradients that are sums over time
// (the recurrent weights' and, with the input projection in the loop, the input weights' and the
// bias's) are accumulated in float32 every Tc steps, as GEMMs over that chunk's Tc * B rows, while
// the chunk is still in cache: the [T, B, H] and [T, B, 5H] intermediate gradients are never
// materialized. 16-bit values are widened chunk by chunk (exactly), so every product accumulates in
// float32 whatever the dtype; the sums are rounded to the dtype once, at the end.

struct BackwardArgs {
  Tensor grad_output, grad_cells, packed_hh_t, packed_hm_t, h0, c0, lengths, output, cell_states, act;
  Tensor dc;            // [B, H] float: the gradient of c_T on entry (grad_c_n or zeros), of c0 on exit
  Tensor grad_proj;     // [T, B, 5H] D, filled when given (the proj contract); else only chunks exist
  Tensor x, weight_in;  // the input projection's x [T, B, I] and [5H, I] weight, when computed in the loop
  Layout layout = kFloat32;
  bool portable = false;  // VNNI weights through the portable twin
  bool poison = false;
};

struct BackwardResult {
  Tensor grad_weight_hh, grad_weight_hm, grad_h0;  // float32 sums; grad_h0 [B, H]
  Tensor grad_x, grad_weight_in;  // with the input projection: x's gradient (D) and [5H, I + 1] float32 sums
                                  // of the input weights' gradient and, in the last column, the bias's
};

int64_t chunk_steps(int64_t T, int64_t B, int64_t H) {
  // About 1024 rows per gradient GEMM (MKL ran at 69 GF with 256 rows, 80 GF from 512 up; the
  // fewer chunks, the fewer passes over the [4H, H] accumulator), with the chunk's [Tc * B, 5H]
  // gradient under 16 MiB of float32 (below glibc's mmap threshold: reused, not page-faulted).
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

template <typename D, typename E>
BackwardResult backward_loop(const BackwardArgs& a) {
  const int64_t T = a.act.size(0), B = a.act.size(1), H = a.act.size(2) / 6;
  const auto& k = kernels<D, E>();
  const auto options = a.output.options();
  const auto f32 = options.dtype(at::kFloat);
  const bool fused = a.x.defined();
  const bool whole = a.grad_proj.defined();
  // Wmh^T [H, H] and Wh^T [H, 4H], both plain: rec = dhm Wmh, dm = dz Wh.
  const PackedView<E> w_rec = view_of<E>(a.packed_hm_t, H, H, false, a.layout, a.portable);
  const PackedView<E> w_dm = view_of<E>(a.packed_hh_t, H, kGates * H, false, a.layout, a.portable);
  // The GEMM operands dz_t and dhm_t: with float32 activations and operands, the D gradients
  // themselves (dz is the first 4H columns of dproj's rows); otherwise E copies of them.
  constexpr bool alias = std::is_same_v<D, float> && std::is_same_v<E, float>;
  const auto e_options = options.dtype(c10::CppTypeToScalarType<E>::value);
  Tensor dz_op = alias ? Tensor() : at::empty({B, kGates * H}, e_options);
  Tensor dhm_op = alias ? Tensor() : at::empty({B, H}, e_options);
  E* dz_p = alias ? nullptr : dz_op.data_ptr<E>();
  E* dhm_p = alias ? nullptr : dhm_op.data_ptr<E>();
  const int64_t ld_dz = alias ? 5 * H : kGates * H;
  // dh carries the full gradient that reached h_{t+1}; dc the one of c_t.
  Tensor dh = at::zeros({B, H}, f32);
  float* dh_p = dh.data_ptr<float>();
  float* dc_p = a.dc.data_ptr<float>();

  // Chunk buffers: the D gradients of Tc steps (unless grad_proj is wanted whole) and float32 copies.
  const int64_t Tc = chunk_steps(T, B, H);
  constexpr bool wide = std::is_same_v<D, float>;
  Tensor gproj_chunk = whole ? Tensor() : new_buffer({Tc, B, 5 * H}, options, a.poison);
  Tensor ghm_chunk = new_buffer({Tc, B, H}, options, a.poison);
  Tensor scratch_proj = wide ? Tensor() : at::empty({Tc * B * 5 * H}, f32);
  Tensor scratch_hm = wide ? Tensor() : at::empty({Tc * B * H}, f32);
  Tensor scratch_h = wide ? Tensor() : at::empty({Tc * B * H}, f32);
  Tensor m_chunk = at::empty({Tc * B * H}, f32);
  BackwardResult r;
  r.grad_weight_hh = at::zeros({kGates * H, H}, f32);
  r.grad_weight_hm = at::zeros({H, H}, f32);
  r.grad_h0 = T > 0 ? new_buffer({B, H}, f32, a.poison) : at::zeros({B, H}, f32);
  Tensor x_1, w_in_f, grad_weight_in_1;
  const int64_t I = fused ? a.x.size(2) : 0;
  if (fused) {
    // [x | 1]: one GEMM gives the input weights' gradient and, in its last column, the bias's.
    x_1 = at::empty({T * B, I + 1}, f32);
    x_1.narrow(1, 0, I).copy_(a.x.reshape({T * B, I}));
    x_1.narrow(1, I, 1).fill_(1.0);
    w_in_f = a.weight_in.to(at::kFloat);
    grad_weight_in_1 = at::zeros({5 * H, I + 1}, f32);
    r.grad_x = new_buffer({T, B, I}, options, a.poison);
  }

  const D* gout_p = ptr_or_null<D>(a.grad_output);
  const float* gcells_p = ptr_or_null<float>(a.grad_cells);
  const D* act_p = a.act.data_ptr<D>();
  const float* cells_p = a.cell_states.data_ptr<float>();
  const float* c0_p = a.c0.data_ptr<float>();
  const int64_t* len_p = ptr_or_null<int64_t>(a.lengths);
  std::vector<float> tiles = tile_buffers();

  // The sums over the chunk of steps [t0, t1), whose gradients are in the chunk buffers.
  auto flush = [&](int64_t t0, int64_t t1) {
    const int64_t steps = t1 - t0, R = steps * B;
    const Tensor gproj_d =
        (whole ? a.grad_proj.narrow(0, t0, steps) : gproj_chunk.narrow(0, 0, steps)).view({R, 5 * H});
    const Tensor gproj = widened<D>(gproj_d, scratch_proj, R, 5 * H);
    const Tensor dz = gproj.narrow(1, 0, kGates * H);
    Tensor m = m_chunk.narrow(0, 0, R * H).view({R, H});
    recompute_m_kernel<D>()(R, H, act_p + t0 * B * 6 * H, m.data_ptr<float>());
    r.grad_weight_hh.addmm_(dz.t(), m);
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
      r.grad_weight_hm.addmm_(dhm.narrow(0, first, n).t(), widened<D>(h_prev_d, scratch_h, n, H));
    }
    if (fused) {
      grad_weight_in_1.addmm_(gproj.t(), x_1.narrow(0, t0 * B, R));
      r.grad_x.narrow(0, t0, steps).view({R, I}).copy_(at::mm(gproj, w_in_f));
    }
  };

  int64_t t1 = T;  // the open chunk is [t0, t1)
  const E* dhm_next = nullptr;  // dhm_{t+1}, the operand of step t's first product
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t t0 = std::max<int64_t>(0, t1 - Tc);
    const bool has_rec = t < T - 1;
    const D* act_t = act_p + t * B * 6 * H;
    const float* cell_t = cells_p + t * B * H;
    const float* cell_prev = t > 0 ? cells_p + (t - 1) * B * H : c0_p;
    const D* gout_t = gout_p != nullptr ? gout_p + t * B * H : nullptr;
    const float* gcells_t = gcells_p != nullptr ? gcells_p + t * B * H : nullptr;
    D* dproj_t = whole ? a.grad_proj.data_ptr<D>() + t * B * 5 * H : gproj_chunk.data_ptr<D>() + (t - t0) * B * 5 * H;
    D* ghm_t = ghm_chunk.data_ptr<D>() + (t - t0) * B * H;
    E* dz_t = alias ? reinterpret_cast<E*>(dproj_t) : dz_p;
    E* dhm_t = alias ? reinterpret_cast<E*>(ghm_t) : dhm_p;
    for_each_tile<E>(w_rec.p.blocks, B, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
      const int64_t n0 = j * w_rec.p.units;
      const int64_t at = row0 * H + n0;
      if (has_rec) {
        tile_gemm(n_rows, dhm_next + row0 * H, H, w_rec, j, tile, false);
      }
      k.backward_cell(n_rows, block_width(w_rec.p, j), H, has_rec ? tile : nullptr, kColumnBlock, dh_p + at,
                      dc_p + at, H, gout_t != nullptr ? gout_t + at : nullptr, H,
                      gcells_t != nullptr ? gcells_t + at : nullptr, H, act_t + row0 * 6 * H + n0, 6 * H,
                      cell_t + at, cell_prev + at, H, dproj_t + row0 * 5 * H + n0, 5 * H,
                      alias ? nullptr : dz_t + row0 * ld_dz + n0, ld_dz, len_p != nullptr ? len_p + row0 : nullptr, t);
    });
    for_each_tile<E>(w_dm.p.blocks, B, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
      const int64_t n0 = j * w_dm.p.units;
      tile_gemm(n_rows, dz_t + row0 * ld_dz, ld_dz, w_dm, j, tile, false);
      k.backward_m(n_rows, block_width(w_dm.p, j), H, tile, kColumnBlock, act_t + row0 * 6 * H + n0, 6 * H,
                   dproj_t + row0 * 5 * H + n0, 5 * H, ghm_t + row0 * H + n0, H,
                   alias ? nullptr : dhm_t + row0 * H + n0, H);
    });
    dhm_next = dhm_t;
    if (t == t0) {
      flush(t0, t1);
      t1 = t0;
    }
  }
  // The gradient of h0 is one more recurrent product, dhm_0 Wmh, plus (lengths) what rows that never
  // started passed straight through.
  if (T > 0) {
    float* gh0_p = r.grad_h0.data_ptr<float>();
    for_each_tile<E>(w_rec.p.blocks, B, tiles, [&](int64_t j, int64_t row0, int64_t n_rows, float* tile) {
      const int64_t at = row0 * H + j * w_rec.p.units;
      tile_gemm(n_rows, dhm_next + row0 * H, H, w_rec, j, tile, false);
      k.grad_h0(n_rows, block_width(w_rec.p, j), tile, kColumnBlock, dh_p + at, H, gh0_p + at, H,
                len_p != nullptr ? len_p + row0 : nullptr);
    });
  }
  r.grad_weight_in = grad_weight_in_1;
  return r;
}

struct BackwardInputs {
  Tensor grad_output, grad_c_n, grad_cells, h0, c0, lengths;
  Layout layout;
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
  check_packed(packed_hh_t, "packed_hh_t", layout, dtype, H, kGates * H, false);
  check_packed(packed_hm_t, "packed_hm_t", layout, dtype, H, H, false);
  check_state(h0, c0, lengths, B, H);
  check_optional(grad_output, "grad_output", dtype, {T, B, H});
  check_optional(grad_c_n, "grad_c_n", at::kFloat, {B, H});
  check_optional(grad_cell_states, "grad_cell_states", at::kFloat, {T, B, H});
  return {defined_or_undefined(grad_output), defined_or_undefined(grad_c_n), defined_or_undefined(grad_cell_states),
          h0, c0, defined_or_undefined(lengths), layout};
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
  a.poison = poison;
  a.portable = portable;
  return a;
}

BackwardResult run_backward(const BackwardArgs& a, at::ScalarType dtype) {
  BackwardResult r;
  dispatch_dtypes(dtype, operand_dtype(a.layout),
                  [&](auto d, auto e_) { r = backward_loop<decltype(d), decltype(e_)>(a); });
  return r;
}

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

std::vector<int64_t> fingerprints(const std::vector<Tensor>& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size());
  for (const Tensor& t : tensors) {
    out.push_back(fingerprint(t));
  }
  return out;
}

std::string kernel_isa() { return use_avx2() ? "avx2" : "default"; }

// Whether the bfloat16 GEMM on VNNI-packed weights (oneDNN's, or with `portable` its portable twin)
// runs here and gives the float32 products of the same numbers (checked on a small problem with
// awkward sizes; any exception means no).
bool bf16_gemm_works(bool portable) {
  try {
    const int64_t M = 5, N = 2 * kColumnBlock + 24, K = 96;
    const Tensor a = at::randn({M, K}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
    const Tensor w = at::randn({N, K}, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
    const Tensor packed = pack_weight(w, false, kVnni, std::nullopt, false);
    const PackedView<BFloat16> view = view_of<BFloat16>(packed, N, K, false, kVnni, portable);
    Tensor out = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
    std::vector<float> tiles = tile_buffers();
    for_each_tile<BFloat16>(view.p.blocks, M, tiles, [&](int64_t j, int64_t row0, int64_t rows, float* tile) {
      tile_gemm(rows, a.data_ptr<BFloat16>() + row0 * K, K, view, j, tile, false);
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(out.data_ptr<float>() + (row0 + r) * N + j * kColumnBlock, tile + r * kColumnBlock,
                    block_width(view.p, j) * sizeof(float));
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
  m.def("pack_weight(Tensor weight, bool gates, int layout, Tensor? input_weight=None, bool transposed=False) -> Tensor");
  m.def(
      "forward(Tensor proj, Tensor packed_hh, Tensor packed_hm, Tensor h0, Tensor c0, Tensor? lengths, "
      "bool save_for_backward, bool return_cell_states, bool poison_buffers=False, "
      "bool portable_bf16=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "forward_input(Tensor x, Tensor weight_im_t, Tensor? bias, Tensor packed_hh_ih, Tensor packed_hm, Tensor h0, "
      "Tensor c0, Tensor? lengths, bool save_for_backward, bool return_cell_states, bool poison_buffers=False, "
      "bool portable_bf16=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor? grad_output, Tensor? grad_c_n, Tensor? grad_cell_states, Tensor packed_hh_t, "
      "Tensor packed_hm_t, Tensor h0, Tensor c0, Tensor? lengths, Tensor output, Tensor cell_states, Tensor act, "
      "bool poison_buffers=False, bool portable_bf16=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward_input(Tensor? grad_output, Tensor? grad_c_n, Tensor? grad_cell_states, Tensor x, "
      "Tensor weight_ih, Tensor weight_im, Tensor packed_hh_t, Tensor packed_hm_t, Tensor h0, Tensor c0, "
      "Tensor? lengths, Tensor output, Tensor cell_states, Tensor act, bool poison_buffers=False, "
      "bool portable_bf16=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fingerprint(Tensor tensor) -> int");
  m.def("fingerprints(Tensor[] tensors) -> int[]");
  m.def("kernel_isa() -> str", &fastmlstm::cpu::kernel_isa);
  m.def("bf16_gemm_works(bool portable=False) -> bool", &fastmlstm::cpu::bf16_gemm_works);
}

// One kernel for every backend key, so that a tensor on another device reaches the checks above and
// gets their message instead of the dispatcher's.
TORCH_LIBRARY_IMPL(fastmlstm_cpu, CompositeExplicitAutograd, m) {
  m.impl("pack_weight", &fastmlstm::cpu::pack_weight);
  m.impl("forward", &fastmlstm::cpu::forward);
  m.impl("forward_input", &fastmlstm::cpu::forward_input);
  m.impl("backward", &fastmlstm::cpu::backward);
  m.impl("backward_input", &fastmlstm::cpu::backward_input);
  m.impl("fingerprint", &fastmlstm::cpu::fingerprint);
  m.impl("fingerprints", &fastmlstm::cpu::fingerprints);
}
