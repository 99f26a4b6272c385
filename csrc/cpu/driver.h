// What the translation units of the CPU backend's host driver share: the packed weight layouts,
// the tile GEMMs and the loop over tiles, the choice of the epilogues' instruction set, the input
// checks, and the operator entry points that mlstm_cpu.cpp registers.
//
// The driver, file by file:
//   mlstm_cpu.cpp  the operators: their registration (torch.ops.fastmlstm_cpu.*), the input checks,
//                  the choice of instruction set, the fingerprints and the bfloat16 GEMM self-test
//   pack.cpp       packed weights: pack_weight and the checks of packed tensors
//   forward.cpp    the forward time loop (the operators forward and forward_input)
//   backward.cpp   the backward time loop and the gradients summed over time (backward, backward_input)
//   gemm.cpp       the float32 GEMMs beside the time loops, as micro-kernel tiles (weight_grad_tiles)
//   buffer_cache.cpp  memory for the activations saved for backward, reused by the next forward
// The step epilogues they call are mlstm_cpu_kernels.h (interface and layouts: mlstm_cpu.h),
// compiled by kernels_default.cpp, kernels_avx2.cpp and kernels_avx512.cpp, which are linked after
// the driver's translation units (see kernels_avx2.cpp).
//
// Legend: T time, B batch rows, H hidden units, I input features, G = 4 gates (i, f, o, u); D the
// activation dtype, E the GEMM operand dtype (mlstm_cpu.h). The contract, shapes and numerics are
// those of fastmlstm/ops/interface.py; the order of operations follows fastmlstm/ops/reference/recurrence.py.
//
// Per forward step, two GEMMs that depend on each other, each run as one pass over column blocks
// of a packed weight (the blocks' rows in tiles of at most kRowBlock; the blocks spread over the
// threads, or each thread on its own rows: see "RowGroup" below):
//   hm = h_{t-1} Wmh^T  -> per tile, forward_m:    m = xm * hm (and save xm, hm)
//   z  = m Wh^T         -> per tile, forward_cell: gates, c_t, h_t, lengths mask (Wh's rows are
//                          permuted so that one tile holds the four gates of 8 or 16 hidden units)
// Per backward step, mirrored:
//   rec = dhm_{t+1} Wmh -> per tile, backward_cell: dh_t, dz_t, dc_{t-1}
//   dm  = dz_t Wh       -> per tile, backward_m:    dxm_t, dhm_t
// A tile's epilogue runs right after its GEMM, while the tile is in L1: z, hm, rec and dm never
// exist as [B, 4H] or [B, H] arrays. The gradients summed over time are GEMMs over chunks of steps.
//
// Two sources of input projections: proj [T, B, 5H] (the contract of fastmlstm/ops/interface.py, for
// the byte model's table-gathered inputs), or x [T, B, I] with the input weights, whose products
// x_t Wx^T and x_t Wmx^T are two more tile GEMMs per step (forward_input / backward_input, used by
// fastmlstm.multiplicative_lstm): no [T, B, 5H] tensor is ever allocated, written or read back.
//
// The tile GEMMs are at::native::cpublas::brgemm (oneDNN's batch-reduce GEMM micro-kernels where
// oneDNN supports the CPU, else ATen's gemm) on weights packed once per weight
// (fastmlstm/ops/cpu/recurrence.py keeps the packed copies while a weight is unchanged): float32
// blocks [K, 32] in general, VNNI-packed bfloat16 blocks where the CPU multiplies bfloat16 natively.
// Every GEMM accumulates in float32 and writes a float32 tile. A row's forward result never depends
// on T, on which rows are computed with it, or on the thread count, so a chunked run repeats the
// one-shot run bit for bit. The backward's gradients are as independent of the thread count where
// its GEMMs beside the loop run as tiles (weight_grad_tiles()); MKL's may differ in the last bits.
#pragma once

#include "mlstm_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>

namespace fastmlstm {
namespace cpu {

using at::Tensor;
using c10::BFloat16;
using c10::Half;

constexpr const char* kWho = "fastmlstm cpu backend: ";

// ------------------------------------------------------------------------------------------------
// Instruction set of the epilogues, chosen at run time (mlstm_cpu.cpp): AVX-512 where ATen itself
// runs AVX-512 kernels, AVX2 where it runs AVX2 ones (at::get_cpu_capability, which honours
// ATEN_CPU_CAPABILITY), else the portable copy; set_kernel_isa may choose a lower one (tests and
// benchmarks compare them in one process).

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa kernel_isa_in_use();

#if defined(FASTMLSTM_HAVE_AVX512_KERNELS) && defined(FASTMLSTM_HAVE_AVX2_KERNELS)
#define FASTMLSTM_BY_ISA(...)                 \
  switch (kernel_isa_in_use()) {              \
    case Isa::kAvx512:                        \
      return isa_avx512::__VA_ARGS__;         \
    case Isa::kAvx2:                          \
      return isa_avx2::__VA_ARGS__;           \
    default:                                  \
      return isa_default::__VA_ARGS__;        \
  }
#else
#define FASTMLSTM_BY_ISA(...) return isa_default::__VA_ARGS__;
#endif

template <typename D, typename E>
const StepKernels<D, E>& kernels() {
  FASTMLSTM_BY_ISA(step_kernels<D, E>())
}

template <typename D>
RecomputeM<D> recompute_m_kernel() {
  FASTMLSTM_BY_ISA(recompute_m<D>())
}

template <typename D>
Widen<D> widen_kernel() {
  FASTMLSTM_BY_ISA(widen<D>())
}

template <typename W>
SmallGemm<W> small_gemm_kernel() {
  FASTMLSTM_BY_ISA(small_gemm<W>())
}

inline VnniGemm vnni_gemm_kernel() { FASTMLSTM_BY_ISA(vnni_gemm()) }

inline Transpose transpose_kernel() { FASTMLSTM_BY_ISA(transpose()) }

inline Fingerprint fingerprint_kernel() { FASTMLSTM_BY_ISA(fingerprint) }

// ------------------------------------------------------------------------------------------------
// Input checks (mlstm_cpu.cpp).

bool is_activation_dtype(at::ScalarType dtype);
void check_input(const Tensor& tensor, const char* name, at::ScalarType dtype, at::IntArrayRef shape);
void check_optional(const std::optional<Tensor>& tensor, const char* name, at::ScalarType dtype,
                    at::IntArrayRef shape);
// A float32, float16 or bfloat16 CPU tensor of `dims` dimensions (`layout` names them in messages).
void check_activations(const Tensor& tensor, const char* name, int64_t dims, const char* layout);
// h0 and c0 [B, H] float32, lengths [B] int64 if given.
void check_state(const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, int64_t B, int64_t H);

Tensor defined_or_undefined(const std::optional<Tensor>& tensor);

template <typename T>
T* ptr_or_null(const Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

// A buffer the kernels overwrite completely. Tests ask for NaN-filled buffers so that an element a
// kernel forgets to write fails the comparison instead of passing by luck.
Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison);
// The same, for activations a forward saves for its backward: from the buffer cache
// (buffer_cache.cpp), whose blocks outlive the tensor for the next call to reuse.
Tensor saved_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison);
int64_t set_buffer_cache_limit(int64_t bytes);  // returns the previous limit
int64_t empty_buffer_cache();                    // frees every cached block; returns the bytes freed
int64_t buffer_cache_bytes();                    // bytes held by cached blocks now

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// Packed weights (pack.cpp). A weight W [N, K] (torch's [out, in] layout, used as x W^T) becomes
// column blocks of C = kNarrowColumns (32) or kWideColumns (64) output columns each (the pack's
// `cols`; the loops read it from the packed shape), zero-padded, in one of three layouts:
//   kFloat32  float32 [blocks, K, C]         block j, row k, column c = W[row(j, c), k]; oneDNN's
//                                            float32 micro-kernels (any input dtype, widened exactly)
//   kVnni     bfloat16 [blocks, K/2, C, 2]   the same with pairs of consecutive k interleaved, for
//                                            the CPU's native bfloat16 micro-kernels
//   kNarrow   16-bit [blocks, K, C]          the float32 layout in the weight's own 16-bit dtype, for
//                                            small batches (small_gemm): half the bytes to read
// row(j, c) is j * C + c for a plain weight. For the gate weight Wh [4H, H] ("gates") a block
// holds q = C / 4 hidden units and its columns are [i(q) f(q) o(q) u(q)]: row(j, c) = g * H + j * q + c'
// with g = c / q_j, c' = c % q_j (the last block has q_j = H - j * q units).

enum Layout : int64_t { kFloat32 = 0, kVnni = 1, kNarrow = 2 };

struct Packing {
  int64_t N, K, blocks, units;  // units: output columns (plain) or hidden units (gates) per block
  bool gates;
  Layout layout;
  int64_t cols;  // columns per block (kNarrowColumns or kWideColumns): a block's and a tile's row stride
};

inline bool valid_columns(int64_t cols) { return cols == kNarrowColumns || cols == kWideColumns; }

inline Packing packing_of(int64_t N, int64_t K, bool gates, Layout layout, int64_t cols) {
  const int64_t units = gates ? cols / kGates : cols;
  const int64_t outputs = gates ? N / kGates : N;
  return {N, K, ceil_div(outputs, units), units, gates, layout, cols};
}

inline int64_t block_units(const Packing& p, int64_t j) {
  const int64_t outputs = p.gates ? p.N / kGates : p.N;
  return std::min(p.units, outputs - j * p.units);
}

// Output columns of block j.
inline int64_t block_width(const Packing& p, int64_t j) {
  return p.gates ? kGates * block_units(p, j) : block_units(p, j);
}

std::vector<int64_t> packed_shape(const Packing& p);

// Packs W [N, K] (float32, float16 or bfloat16) in `layout` (a Layout value) with blocks of `cols`
// columns, where W is `weight`, or [weight | input_weight] (concatenated along the input axis:
// z = [m | x] [Wh | Wx]^T), or, with `transposed`, weight^T (for the backward's products with the
// transposed weights).
Tensor pack_weight(const Tensor& weight, bool gates, int64_t layout, const std::optional<Tensor>& input_weight,
                   bool transposed, int64_t cols);

// The layout of a packed tensor, from its dtype and rank, for activations of `dtype`.
Layout layout_of(const Tensor& packed, const char* name, at::ScalarType dtype);

// Checks that a packed tensor can serve as the weight [N, K] of the loops in `layout`; returns its
// packing (with the block width it was packed with).
Packing check_packed(const Tensor& packed, const char* name, Layout layout, at::ScalarType dtype, int64_t N,
                     int64_t K, bool gates);

// The dtype of the GEMMs' activation operand for a layout: bfloat16 for the native VNNI layout,
// float32 otherwise.
inline at::ScalarType operand_dtype(Layout layout) { return layout == kVnni ? at::kBFloat16 : at::kFloat; }

// ------------------------------------------------------------------------------------------------
// Tile GEMMs: C [M, width(j)] (float32, row stride p.cols) (+)= A [M, K] (row stride lda) x block j.

template <typename E>
struct PackedView {
  const void* data = nullptr;
  Packing p{};
  at::ScalarType weight_dtype = at::kFloat;
  bool portable = false;  // VNNI blocks multiplied by the portable twin instead of oneDNN (mlstm_cpu.h)
  template <typename W>
  const W* block(int64_t j) const {
    return static_cast<const W*>(data) + j * p.K * p.cols;
  }
};

// A packed tensor, already checked (check_packed), as the loops read it.
template <typename E>
PackedView<E> view_of(const Tensor& packed, const Packing& p, bool portable) {
  return {packed.data_ptr(), p, packed.scalar_type(), portable};
}

// The K range of one micro-kernel call, in elements of E: the whole of K while A's rows span at most
// 8 KiB of it, else equal pieces of at most 4 KiB (a multiple of 32 elements, so VNNI pairs stay
// whole). oneDNN's brgemm ran long K ranges up to 2.7x slower than the same product issued in such
// pieces and summed in C (bench/kernels/NOTES-cpu.md, "Long K ranges"). The split depends on K and E
// only, so every path that calls tile_gemm sums in the same order.
// The two limits are settable (set_k_split, mlstm_cpu.cpp) for benchmarks that compare splits in one
// process; not meant to change while a loop runs.
constexpr int64_t kWholeKBytes = 8192;
constexpr int64_t kKPieceBytes = 4096;
extern std::atomic<int64_t> g_whole_k_bytes, g_k_piece_bytes;
inline int64_t k_piece(int64_t K, int64_t elem_bytes) {
  if (K * elem_bytes <= g_whole_k_bytes.load(std::memory_order_relaxed)) {
    return K;
  }
  const int64_t pieces = ceil_div(K * elem_bytes, g_k_piece_bytes.load(std::memory_order_relaxed));
  return ceil_div(ceil_div(K, pieces), 32) * 32;
}

// C (+)= A [M, k0 + K) x rows [k0, k0 + K) of block j.
template <typename E>
void tile_gemm_range(int64_t M, const E* A, int64_t lda, const PackedView<E>& w, int64_t j, int64_t k0, int64_t K,
                     float* C, bool add_C) {
  const int64_t N = block_width(w.p, j);
  const int64_t cols = w.p.cols;
  const int64_t at = k0 * cols;  // a block's row k (VNNI: pair k / 2, k even) starts at k * cols
  if constexpr (std::is_same_v<E, float>) {
    at::native::cpublas::brgemm(M, N, K, lda, cols, cols, add_C, A + k0, w.template block<float>(j) + at, C,
                                false);
  } else if (w.portable) {
    vnni_gemm_kernel()(M, N, K, A + k0, lda, w.template block<BFloat16>(j) + at, cols, C, add_C);
  } else {
    at::native::cpublas::brgemm(M, N, K, lda, cols, cols, add_C, A + k0, w.template block<BFloat16>(j) + at, C,
                                true);
  }
}

template <typename E>
void tile_gemm(int64_t M, const E* A, int64_t lda, const PackedView<E>& w, int64_t j, float* C, bool add_C) {
  if constexpr (std::is_same_v<E, float>) {
    if (w.p.layout == kNarrow) {
      TORCH_INTERNAL_ASSERT(!add_C);
      const int64_t N = block_width(w.p, j);
      if (w.weight_dtype == at::kBFloat16) {
        small_gemm_kernel<BFloat16>()(M, N, w.p.K, A, lda, w.template block<BFloat16>(j), w.p.cols, C);
      } else {
        small_gemm_kernel<Half>()(M, N, w.p.K, A, lda, w.template block<Half>(j), w.p.cols, C);
      }
      return;
    }
  }
  const int64_t piece = k_piece(w.p.K, sizeof(E));
  for (int64_t k0 = 0; k0 < w.p.K; k0 += piece) {
    tile_gemm_range(M, A, lda, w, j, k0, std::min(piece, w.p.K - k0), C, add_C || k0 > 0);
  }
}

// How the backward's float32 GEMMs beside the time loops run (gemm.cpp): the weight gradients and
// x's gradient, as MKL's GEMMs or as oneDNN's micro-kernel tiles (the forward's xm is always tiles:
// forward.cpp, xm_chunk_at). Chosen by
// the epilogues' instruction set (auto), or forced (set_weight_grad_gemm, mlstm_cpu.cpp) for tests
// and benchmarks that compare the two in one process.
constexpr int64_t kWeightGradAuto = 0, kWeightGradMkl = 1, kWeightGradTiles = 2;
extern std::atomic<int64_t> g_weight_grad_gemm;
bool weight_grad_tiles();  // whether those GEMMs run as tiles now

// The input weights' gradient that a weight gradient's transposed slices also feed (the input
// projection in the loop): out [N, cols + 1] (row stride ld_out) += A^T [x | 1], where x [R, cols]
// has row stride ld_x; the last column, A's column sums, is the bias's gradient.
struct InputSums {
  float* out;
  int64_t ld_out;
  const float* x;
  int64_t ld_x, cols;
};

// As micro-kernel tiles, over A [R, N] (float32, any row stride): dW [n_main, H] += A[:, :n_main]^T m
// (m [R, H]) and, with `in`, the input weights' gradient of all N columns.
void gradient_tiles(const Tensor& A, int64_t n_main, const Tensor& dW, const Tensor& m, const InputSums* in);
// dW [N, H] += dz^T m over dz's R rows (dz [R, N] with any row stride), MKL's or as tiles.
void weight_gradient(const Tensor& dW, const Tensor& dz, const Tensor& m);
// C [M, N] = A [M, K] B [K, N], float32, row-major with the given row strides, as micro-kernel
// tiles of rows over the threads. A row of C depends on that row of A alone, never on M.
void rows_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc);

constexpr int64_t kTileElems = kRowBlock * kMaxColumns;
constexpr int64_t kTilesPerThread = 2;

inline std::vector<float> tile_buffers() {
  return std::vector<float>(at::get_num_threads() * kTilesPerThread * kTileElems);
}

// This thread's kTilesPerThread tile buffers in `buffers` (tile_buffers()). A parallel region may
// hold more threads than there were when the buffers were sized: torch.set_num_threads in another
// Python thread moves the count a thread reads (torch sets each thread's OpenMP count from the last
// one set, process-wide, when it first asks), and a thread index past the buffers wrote into the
// heap beyond them. Such a thread takes buffers of its own, kept for its next call.
inline float* thread_tiles(std::vector<float>& buffers) {
  constexpr int64_t kPerThread = kTilesPerThread * kTileElems;
  const int64_t tid = at::get_thread_num();
  if ((tid + 1) * kPerThread <= static_cast<int64_t>(buffers.size())) {
    return buffers.data() + tid * kPerThread;
  }
  thread_local std::vector<float> own(kPerThread);
  return own.data();
}

// body(j, row0, rows, tiles) for every column block j < blocks and row tile of rows [0, M), the
// column blocks spread over threads; tiles: this thread's kTilesPerThread tile buffers.
template <typename E, typename Body>
void for_each_tile(int64_t blocks, int64_t M, std::vector<float>& buffers, const Body& body) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    float* tiles = thread_tiles(buffers);
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

// The same in the calling thread alone (the row-parallel loops below, one thread per row group).
template <typename Body>
void for_each_tile_here(int64_t blocks, int64_t M, std::vector<float>& buffers, const Body& body) {
  float* tiles = thread_tiles(buffers);
  for (int64_t j = 0; j < blocks; ++j) {
    for (int64_t row0 = 0; row0 < M; row0 += kRowBlock) {
      body(j, row0, std::min(kRowBlock, M - row0), tiles);
    }
  }
}

// for_each_tile (parallel: the column blocks over all threads) or for_each_tile_here (this thread).
template <typename E, typename Body>
void for_tiles(bool parallel, int64_t blocks, int64_t M, std::vector<float>& buffers, const Body& body) {
  if (parallel) {
    for_each_tile<E>(blocks, M, buffers, body);
  } else {
    for_each_tile_here(blocks, M, buffers, body);
  }
}

// The batch rows a loop works on: first, first + stride, first + 2 stride, ... Each batch row's
// recurrence is independent of the others', so the time loops run in one of two ways:
//   column-parallel  all rows (first 0, stride 1), every step's column blocks spread over the
//                    threads (for_each_tile): two synchronizations of all threads per step;
//   row-parallel     thread g takes rows g, g + G, ... (G threads) through a whole chunk of steps
//                    with its column blocks in turn (for_each_tile_here): no synchronization
//                    inside a chunk, but every thread reads all the weights every step.
// Every row is computed the same way in both (the same tile GEMMs over the same K, the same
// epilogues): the results are bit for bit the same, whatever the thread count. Strided rows sort
// the longest texts of a featurize batch (rows longest first) across all threads.
struct RowGroup {
  int64_t first = 0, stride = 1;
  // How many of the batch rows [0, n) are in the group.
  int64_t count(int64_t n) const { return n > first ? (n - first + stride - 1) / stride : 0; }
};

// Row-parallel (returns the number of groups, one per thread; 1: column-parallel) where every
// thread gets enough rows to keep its tile GEMMs efficient and the weights every thread reads each
// step (weight_bytes) are a small part of a last-level cache: when every thread streams larger
// ones through a shared L3 each step, they evict each other and the doubled reads cost more than
// the two barriers of a column-parallel step. Without synchronizations inside a chunk, a step does
// not wait for the slowest thread: on a shared machine a thread that loses its core for a while no
// longer stalls the other at every step (bench/kernels/NOTES-cpu.md, "CPU (issue 24)", for both sides
// of the trade and the measurements behind the limit).
constexpr int64_t kMinRowsPerThread = 8;
constexpr int64_t kRowParallelWeightBytes = int64_t(8) << 20;
inline int64_t row_groups(int64_t B, int64_t weight_bytes) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && B >= kMinRowsPerThread * threads && weight_bytes <= kRowParallelWeightBytes ? threads : 1;
}

// The bytes of a packed weight (all its blocks).
template <typename E>
int64_t packed_bytes(const PackedView<E>& w) {
  return w.p.blocks * w.p.K * w.p.cols * static_cast<int64_t>(c10::elementSize(w.weight_dtype));
}

// lengths [B] of the group's rows, in the group's order (the epilogues read one per tile row).
inline std::vector<int64_t> group_lengths(const int64_t* lengths, int64_t B, const RowGroup& g) {
  std::vector<int64_t> out;
  for (int64_t r = g.first; lengths != nullptr && r < B; r += g.stride) {
    out.push_back(lengths[r]);
  }
  return out;
}

// steps(group, its rows' lengths or null, parallel) for the row groups of B rows: one call over all
// rows whose tiles spread over the threads (G == 1, column-parallel), or one call per group, each
// on its own thread with its tiles run there (row-parallel; see RowGroup).
template <typename E, typename Steps>
void for_each_row_group(int64_t G, int64_t B, const int64_t* lengths, const Steps& steps) {
  if (G == 1) {
    steps(RowGroup{}, lengths, true);
    return;
  }
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const RowGroup group{g, G};
      const std::vector<int64_t> len_g = group_lengths(lengths, B, group);
      steps(group, lengths != nullptr ? len_g.data() : nullptr, false);
    }
    if constexpr (!std::is_same_v<E, float>) {
      at::native::cpublas::brgemm_release(true);  // AMX tiles, where the GEMMs used them
    }
  });
}

// Runs fn(D(), E()) for the (activation, operand) dtype pair at hand: the loops' template arguments.
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

// ------------------------------------------------------------------------------------------------
// The operators' entry points that live beside their loops (registered in mlstm_cpu.cpp).

// forward.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& proj, const Tensor& packed_hh,
                                                   const Tensor& packed_hm, const Tensor& h0, const Tensor& c0,
                                                   const std::optional<Tensor>& lengths, bool save_for_backward,
                                                   bool return_cell_states, bool poison_buffers,
                                                   bool portable_bf16);
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_input(
    const Tensor& x, const Tensor& weight_im_t, const std::optional<Tensor>& bias, const Tensor& packed_hh_ih,
    const Tensor& packed_hm, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    bool save_for_backward, bool return_cell_states, bool poison_buffers, bool portable_bf16);

// backward.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& packed_hh_t, const Tensor& packed_hm_t,
    const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output,
    const Tensor& cell_states, const Tensor& act, bool poison_buffers, bool portable_bf16);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_input(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_c_n,
    const std::optional<Tensor>& grad_cell_states, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_im, const Tensor& packed_hh_t, const Tensor& packed_hm_t, const Tensor& h0,
    const Tensor& c0, const std::optional<Tensor>& lengths, const Tensor& output, const Tensor& cell_states,
    const Tensor& act, bool poison_buffers, bool portable_bf16);

}  // namespace cpu
}  // namespace fastmlstm
