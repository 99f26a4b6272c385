// The operators of the CPU backend (torch.ops.fastmlstm_cpu.*): their registration, the input
// checks the driver shares, the choice of the epilogues' instruction set, and odds and ends the
// Python layer asks for (fingerprints, the instruction set in use, the bfloat16 GEMM self-test).
// The loops and the packing live beside this file (forward.cpp, backward.cpp, pack.cpp); driver.h
// holds what they share, the legend, and the shape of the loops.
//
// This is the first translation unit of the library, ahead of kernels_avx2.cpp and kernels_avx512.cpp:
// inline functions that they also instantiate resolve to the baseline code (see kernels_avx2.cpp).

#include "driver.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

namespace fastmlstm {
namespace cpu {

// The K split of the tile GEMMs (driver.h, k_piece).
std::atomic<int64_t> g_whole_k_bytes{kWholeKBytes};
std::atomic<int64_t> g_k_piece_bytes{kKPieceBytes};

// How the backward computes its float32 weight gradients (driver.h, kWeightGrad*): the tiles where
// the AVX-512 epilogues run (whose copy of the transpose works in registers), MKL elsewhere.
std::atomic<int64_t> g_weight_grad_gemm{kWeightGradAuto};

bool weight_grad_tiles() {
  const int64_t mode = g_weight_grad_gemm.load(std::memory_order_relaxed);
  return mode == kWeightGradTiles || (mode == kWeightGradAuto && kernel_isa_in_use() == Isa::kAvx512);
}

// ------------------------------------------------------------------------------------------------
// Instruction set of the epilogues.

namespace {

// The best set this CPU runs, as far as ATen runs it too (ATEN_CPU_CAPABILITY can lower it).
Isa best_kernel_isa() {
  const std::string capability = at::get_cpu_capability();
#if defined(FASTMLSTM_HAVE_AVX512_KERNELS) && defined(FASTMLSTM_HAVE_AVX2_KERNELS)
  if (capability == "AVX512") {
    return Isa::kAvx512;
  }
  if (capability == "AVX2") {
    return Isa::kAvx2;
  }
#endif
  return Isa::kDefault;
}

// -1 until first asked; then the set in use. Atomic: the loops read it from every thread.
std::atomic<int> g_kernel_isa{-1};

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace

Isa kernel_isa_in_use() {
  int isa = g_kernel_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = static_cast<int>(best_kernel_isa());
    g_kernel_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
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

void check_state(const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, int64_t B, int64_t H) {
  check_input(h0, "h0", at::kFloat, {B, H});
  check_input(c0, "c0", at::kFloat, {B, H});
  check_optional(lengths, "lengths", at::kLong, {B});
}

Tensor defined_or_undefined(const std::optional<Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? *tensor : Tensor();
}

Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  if (poison) {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(shape, options);
}

// ------------------------------------------------------------------------------------------------
// Odds and ends the Python layer asks for.

namespace {

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

std::string kernel_isa() { return isa_name(kernel_isa_in_use()); }

// The sets this CPU can run, best first.
std::vector<std::string> kernel_isas() {
  std::vector<std::string> out;
  for (int isa = static_cast<int>(best_kernel_isa()); isa >= 0; --isa) {
    out.emplace_back(isa_name(static_cast<Isa>(isa)));
  }
  return out;
}

// Runs the epilogues with `name` from now on (one of kernel_isas(); "" for the best one), for tests
// and benchmarks that compare the sets in one process. Not meant to change while a loop runs.
std::string set_kernel_isa(const std::string& name) {
  const Isa best = best_kernel_isa();
  if (name.empty()) {
    g_kernel_isa.store(static_cast<int>(best));
    return isa_name(best);
  }
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    if (name == isa_name(static_cast<Isa>(isa))) {
      g_kernel_isa.store(isa);
      return name;
    }
  }
  TORCH_CHECK(false, kWho, "kernel instruction set '", name, "' cannot run here; choose one of ",
              c10::Join(", ", kernel_isas()));
}

// The K split of the tile GEMMs (driver.h, k_piece): [whole, piece] bytes of a row of A; returns the
// previous pair. For benchmarks comparing splits in one process; 0, 0 restores the defaults.
std::vector<int64_t> set_k_split(int64_t whole_bytes, int64_t piece_bytes) {
  TORCH_CHECK(whole_bytes >= 0 && piece_bytes >= 0, kWho, "set_k_split takes byte counts >= 0");
  std::vector<int64_t> previous{g_whole_k_bytes.load(), g_k_piece_bytes.load()};
  g_whole_k_bytes.store(whole_bytes > 0 ? whole_bytes : kWholeKBytes);
  g_k_piece_bytes.store(piece_bytes > 0 ? std::max<int64_t>(piece_bytes, 64) : kKPieceBytes);
  return previous;
}

std::vector<int64_t> k_split() { return {g_whole_k_bytes.load(), g_k_piece_bytes.load()}; }

// How the backward computes its float32 weight gradients (driver.h, kWeightGrad*: 0 auto, 1 MKL, 2
// micro-kernel tiles); returns the previous mode. For tests and benchmarks comparing the two.
int64_t set_weight_grad_gemm(int64_t mode) {
  TORCH_CHECK(mode >= kWeightGradAuto && mode <= kWeightGradTiles, kWho,
              "set_weight_grad_gemm takes 0 (auto), 1 (MKL) or 2 (micro-kernel tiles), got ", mode);
  return g_weight_grad_gemm.exchange(mode);
}

std::string weight_grad_gemm() { return weight_grad_tiles() ? "tiles" : "mkl"; }

// Whether the bfloat16 GEMM on VNNI-packed weights (oneDNN's, or with `portable` its portable twin)
// runs here and gives the float32 products of the same numbers, with blocks of either width
// (checked on a small problem with awkward sizes; any exception means no). Its numbers come from a
// generator of its own: a check run on first use must not move torch's global one (a training run
// resumed in a fresh process would otherwise record another random state than an uninterrupted one).
bool bf16_gemm_works(bool portable) {
  try {
    const at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(/*seed_in=*/1);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    for (const int64_t cols : {kNarrowColumns, kWideColumns}) {
      const int64_t M = 5, N = 2 * cols + 24, K = 96;
      const Tensor a = at::randn({M, K}, gen, f32).to(at::kBFloat16);
      const Tensor w = at::randn({N, K}, gen, f32).to(at::kBFloat16);
      const Tensor packed = pack_weight(w, false, kVnni, std::nullopt, false, cols);
      const PackedView<BFloat16> view =
          view_of<BFloat16>(packed, check_packed(packed, "w", kVnni, at::kBFloat16, N, K, false), portable);
      Tensor out = at::empty({M, N}, f32);
      std::vector<float> tiles = tile_buffers();
      for_each_tile<BFloat16>(view.p.blocks, M, tiles, [&](int64_t j, int64_t row0, int64_t rows, float* tile) {
        tile_gemm(rows, a.data_ptr<BFloat16>() + row0 * K, K, view, j, tile, false);
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(out.data_ptr<float>() + (row0 + r) * N + j * cols, tile + r * cols,
                      block_width(view.p, j) * sizeof(float));
        }
      });
      const Tensor expected = at::mm(a.to(at::kFloat), w.to(at::kFloat).t());
      if (out.sub(expected).abs().max().item<float>() > 1e-4f * (1.0f + expected.abs().max().item<float>())) {
        return false;
      }
    }
    return true;
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
  m.def(
      "pack_weight(Tensor weight, bool gates, int layout, Tensor? input_weight=None, bool transposed=False, "
      "int cols=32) -> Tensor");
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
  m.def("kernel_isas() -> str[]", &fastmlstm::cpu::kernel_isas);
  m.def("set_kernel_isa(str name) -> str", &fastmlstm::cpu::set_kernel_isa);
  m.def("bf16_gemm_works(bool portable=False) -> bool", &fastmlstm::cpu::bf16_gemm_works);
  m.def("set_k_split(int whole_bytes, int piece_bytes) -> int[]", &fastmlstm::cpu::set_k_split);
  m.def("k_split() -> int[]", &fastmlstm::cpu::k_split);
  m.def("set_buffer_cache_limit(int bytes) -> int", &fastmlstm::cpu::set_buffer_cache_limit);
  m.def("set_weight_grad_gemm(int mode) -> int", &fastmlstm::cpu::set_weight_grad_gemm);
  m.def("weight_grad_gemm() -> str", &fastmlstm::cpu::weight_grad_gemm);
  m.def("empty_buffer_cache() -> int", &fastmlstm::cpu::empty_buffer_cache);
  m.def("buffer_cache_bytes() -> int", &fastmlstm::cpu::buffer_cache_bytes);
}

// One kernel for every backend key, so that a tensor on another device reaches the operators' checks
// and gets their message instead of the dispatcher's.
TORCH_LIBRARY_IMPL(fastmlstm_cpu, CompositeExplicitAutograd, m) {
  m.impl("pack_weight", &fastmlstm::cpu::pack_weight);
  m.impl("forward", &fastmlstm::cpu::forward);
  m.impl("forward_input", &fastmlstm::cpu::forward_input);
  m.impl("backward", &fastmlstm::cpu::backward);
  m.impl("backward_input", &fastmlstm::cpu::backward_input);
  m.impl("fingerprint", &fastmlstm::cpu::fingerprint);
  m.impl("fingerprints", &fastmlstm::cpu::fingerprints);
}
