// Packed weights of the CPU backend: the operator pack_weight, which lays a weight out in the column
// blocks the tile GEMMs read, and the checks that a packed tensor fits a loop. The three layouts
// are described in driver.h ("Packed weights"); legend there too.

#include "driver.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace fastmlstm {
namespace cpu {
namespace {

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
  return p.layout == kVnni ? (k / 2) * p.cols * 2 + c * 2 + (k % 2) : k * p.cols + c;
}

// Blocks of W^T: row k of every block is a piece of the source's row k, contiguous. The rows go
// outermost (each source row read once, in order): block by block, a pack of a wide transposed
// weight read a short piece of every one of its K rows, a page apart, per block, and missed the TLB
// on nearly every row (bench/kernels/NOTES-cpu-kernels.md, "The packs").
template <typename In, typename Out>
void pack_transposed(const Source<In>& src, Out* out, const Packing& p) {
  const int64_t block_elems = p.K * p.cols;
  const int64_t pair = p.layout == kVnni ? 2 : 1;  // VNNI rows go in pairs (K is even there)
  at::parallel_for(0, p.K / pair, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin * pair; k < end * pair; k += pair) {
      const In* row = src.first + k * src.N;
      for (int64_t j = 0; j < p.blocks; ++j) {
        const int64_t width = block_width(p, j);
        const In* piece = row + j * p.units;
        Out* dst = out + j * block_elems + k * p.cols;  // VNNI: pair k / 2 starts at (k / 2) * 2 * cols
        if (pair == 2) {
          const In* next = piece + src.N;  // row k + 1
          for (int64_t c = 0; c < width; ++c) {
            dst[2 * c] = static_cast<Out>(piece[c]);
            dst[2 * c + 1] = static_cast<Out>(next[c]);
          }
        } else {
          for (int64_t c = 0; c < width; ++c) {
            dst[c] = static_cast<Out>(piece[c]);
          }
        }
        std::fill(dst + pair * width, dst + pair * p.cols, Out(0));
      }
    }
  });
}

// Block j of a float32 weight in the float32 layout, or of a bfloat16 one in the VNNI layout
// (words: the 32-bit pairs of consecutive k, which the VNNI layout keeps side by side): each run of
// consecutive source rows (a gate's units, or the whole block of a plain weight) is a [rows, K] slab
// of words written transposed into its columns, 8 x 8 at a time in registers (transpose_kernel, with
// the AVX2 or AVX-512 epilogues), from W and then from the second weight's columns.
template <typename T>
void pack_block_words(const Source<T>& src, T* block, const Packing& p, int64_t j) {
  constexpr int64_t per_word = sizeof(float) / sizeof(T);  // 1 (float32) or 2 (a VNNI pair)
  const auto words = [](const T* ptr) { return reinterpret_cast<const float*>(ptr); };
  float* out = reinterpret_cast<float*>(block);
  const Transpose transpose = transpose_kernel();
  const int64_t k_second = p.K - src.k_first;
  const int64_t first_words = src.k_first / per_word, second_words = k_second / per_word;
  const int64_t runs = p.gates ? kGates : 1;
  const int64_t run = p.gates ? block_units(p, j) : block_width(p, j);
  for (int64_t g = 0; g < runs; ++g) {
    const int64_t c0 = g * run, n0 = source_row(p, j, c0);
    transpose(run, first_words, words(src.first + n0 * src.k_first), first_words, out + c0, p.cols);
    if (src.second != nullptr) {
      transpose(run, second_words, words(src.second + n0 * k_second), second_words, out + first_words * p.cols + c0,
                p.cols);
    }
  }
}

// Whether the blocks go through pack_block_words: a transpose in registers, and source rows that
// are whole words (a VNNI pair never straddles W and the second weight).
template <typename In, typename Out>
bool packs_by_words(const Source<In>& src, const Packing& p) {
  if (kernel_isa_in_use() == Isa::kDefault) {
    return false;
  }
  if constexpr (std::is_same_v<In, float> && std::is_same_v<Out, float>) {
    return p.layout == kFloat32;
  } else if constexpr (std::is_same_v<In, BFloat16> && std::is_same_v<Out, BFloat16>) {
    return p.layout == kVnni && src.k_first % 2 == 0;
  }
  return false;
}

template <typename In, typename Out>
void pack_blocks(const Source<In>& src, Out* out, const Packing& p) {
  if (src.transposed) {
    pack_transposed(src, out, p);
    return;
  }
  const int64_t block_elems = p.K * p.cols;
  const int64_t k_second = p.K - src.k_first;
  const bool by_words = packs_by_words<In, Out>(src, p);
  at::parallel_for(0, p.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      Out* block = out + j * block_elems;
      const int64_t width = block_width(p, j);
      if (width < p.cols) {
        std::fill(block, block + block_elems, Out(0));  // the padding columns
      }
      if constexpr (std::is_same_v<In, Out>) {
        if (by_words) {
          pack_block_words(src, block, p, j);
          continue;
        }
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

}  // namespace

std::vector<int64_t> packed_shape(const Packing& p) {
  if (p.layout == kVnni) {
    return {p.blocks, p.K / 2, p.cols, 2};
  }
  return {p.blocks, p.K, p.cols};
}

Tensor pack_weight(const Tensor& weight, bool gates, int64_t layout, const std::optional<Tensor>& input_weight,
                   bool transposed, int64_t cols) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), kWho, "pack_weight expects a CPU tensor");
  TORCH_CHECK(weight.dim() == 2, kWho, "pack_weight expects a 2-D weight [N, K], got shape ", weight.sizes());
  TORCH_CHECK(is_activation_dtype(weight.scalar_type()), kWho,
              "pack_weight expects float32, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(layout == kFloat32 || layout == kVnni || layout == kNarrow, kWho, "unknown packing layout ", layout);
  TORCH_CHECK(valid_columns(cols), kWho, "pack_weight: blocks of ", kNarrowColumns, " or ", kWideColumns,
              " columns, got ", cols);
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
  const Packing p = packing_of(N, K, gates, static_cast<Layout>(layout), cols);
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

Packing check_packed(const Tensor& packed, const char* name, Layout layout, at::ScalarType dtype, int64_t N,
                     int64_t K, bool gates) {
  TORCH_CHECK(layout_of(packed, name, dtype) == layout, kWho, name,
              " must be packed in the same layout as the other weights of the call");
  const int64_t cols = packed.size(2);  // [blocks, K, C] or [blocks, K/2, C, 2]
  TORCH_CHECK(valid_columns(cols), kWho, name, " is not a packed weight (blocks of ", cols, " columns, shape ",
              packed.sizes(), ")");
  const Packing p = packing_of(N, K, gates, layout, cols);
  const std::vector<int64_t> shape = packed_shape(p);
  TORCH_CHECK(packed.sizes() == at::IntArrayRef(shape), kWho, name, " must have the packed shape ",
              at::IntArrayRef(shape), " of a [", N, ", ", K, "] weight, got ", packed.sizes());
  return p;
}

}  // namespace cpu
}  // namespace fastmlstm
