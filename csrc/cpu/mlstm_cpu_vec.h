// The vector helpers of the CPU backend's epilogues (mlstm_cpu_kernels.h), compiled with them once
// per instruction set: the vector type and width, loads and stores of float32 and 16-bit values
// (partial vectors at a row's tail), rounding to a 16-bit dtype, and sigmoid and tanh on a fast
// exp. The includer defines FASTMLSTM_ISA, the namespace of its copy (see mlstm_cpu_kernels.h).
#pragma once

#ifndef FASTMLSTM_ISA
#error "define FASTMLSTM_ISA (the namespace of this copy of the kernels) before including mlstm_cpu_vec.h"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace fastmlstm {
namespace cpu {
namespace FASTMLSTM_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define FASTMLSTM_VEC16 1
// One vector of V 16-bit values <-> V floats in registers (at::vec's partial 16-bit loads and stores
// go through memory, and the epilogues move V values at a time). Round to nearest even, as c10's.
#if defined(CPU_CAPABILITY_AVX512)
using Raw16 = __m256i;
using RawF = __m512;
#else
using Raw16 = __m128i;
using RawF = __m256;
#endif

template <typename T>
inline Vec widen16(Raw16 raw) {
  RawF out;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    at::vec::cvtbf16_fp32(raw, out);
  } else {
    at::vec::cvtfp16_fp32(raw, out);
  }
  return Vec(out);
}

template <typename T>
inline Raw16 narrow16(const Vec& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return at::vec::cvtfp32_bf16(RawF(v));
  } else {
    return at::vec::cvtfp32_fp16(RawF(v));
  }
}
#endif

template <typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == V ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // Masked loads and stores of the tail: no round trip through memory.
    return widen16<T>(n == V ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                             : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
#else
#if defined(CPU_CAPABILITY_AVX2)
    if (n == V) {
      return widen16<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
#endif
    const auto packed = at::vec::Vectorized<T>::loadu(p, n);
    return std::get<0>(at::vec::convert_to_float<T>(packed));
#endif
  }
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, static_cast<int>(n));
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (n == V) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16<T>(v));
    } else {
      _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), narrow16<T>(v));
    }
#else
#if defined(CPU_CAPABILITY_AVX2)
    if (n == V) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow16<T>(v));
      return;
    }
#endif
    at::vec::convert_from_float<T>(v, v).store(p, static_cast<int>(n));
#endif
  }
}

// v rounded to D (round to nearest even) and widened back: the value a D store would hold.
template <typename D>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<D, float>) {
    return v;
  } else {
#if defined(FASTMLSTM_VEC16)
    return widen16<D>(narrow16<D>(v));
#else
    return std::get<0>(at::vec::convert_to_float<D>(at::vec::convert_from_float<D>(v, v)));
#endif
  }
}

// sigmoid and tanh from a fast exp: much cheaper than the correctly rounded-ish Sleef u10
// functions, which made up a large share of a step (see bench/kernels/NOTES.md). Their absolute
// errors stay below the float32 GEMMs' rounding noise (tests/tolerances.py). A NaN pre-activation
// (e.g. from an infinite input) must propagate as it does in the reference loop, never become a
// plausible finite value.
#if defined(FASTMLSTM_VEC16)
// The AVX2 and AVX-512 copies: exp(x) for x clamped to [-86, 89], where a NaN stays NaN (min and
// max return their second operand when either is NaN, so no blend is needed): x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite's reduction), exp(r) by its Taylor polynomial to
// r^6 / 6! (truncation under 1.3e-7 relative), times 2^n: AVX-512's scalef, or 2^(n - 1) written
// into the exponent field and doubled (n - 1 in [-125, 127]: always a normal float; a NaN's p makes
// the product NaN whatever n became). Above ln(FLT_MAX) = 88.7228 the product overflows to +inf, as
// std::exp (and the reference's torch.sigmoid) does, so 1 / (1 + inf) is exactly 0: a gate
// saturated shut (z below -88.73, or -inf) is 0, never 1 / FLT_MAX, which would turn a 0 * inf
// further on (an infinite weight, or c) into a finite value where the reference has NaN. So sigmoid
// is exactly 1 from x = 17 and exactly 0 below -88.73, tanh exactly +-1 from |x| = 9.
inline Vec exp_clamped(const Vec& v) {
  constexpr float kCoeffs[] = {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // at::vec's clamps are max(bound, x) and min(bound, x): x second, so a NaN x comes back.
  const Vec x = at::vec::clamp_min(at::vec::clamp_max(v, Vec(89.0f)), Vec(-86.0f));
  const Vec n = (x * Vec(kLog2e)).round();  // to nearest
  const Vec r = at::vec::fmadd(n, Vec(-kLn2Lo), at::vec::fmadd(n, Vec(-kLn2Hi), x));
  Vec p(1.0f / 720.0f);
  for (const float c : kCoeffs) {
    p = at::vec::fmadd(p, r, Vec(c));
  }
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_scalef_ps(p, n));
#else
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  const Vec y = p * Vec(_mm256_castsi256_ps(e));
  return y + y;
#endif
}

inline Vec sigmoid(const Vec& x) { return Vec(1.0f) / (Vec(1.0f) + exp_clamped(Vec(0.0f) - x)); }

// 1 - 2 / (1 + exp(2x)): +-1 at the ends.
inline Vec tanh(const Vec& x) { return Vec(1.0f) - Vec(2.0f) / (Vec(1.0f) + exp_clamped(x + x)); }
#else
// The portable copy: ATen's exp_u20 (std::exp on x86's baseline; on other CPUs a degree-5
// polynomial, relative error under 2e-7, whose argument may be clamped to float's range, and the
// clamp may turn a NaN argument into a bound: so both put NaN back where x is NaN).
inline Vec sigmoid(const Vec& x) {
  // Exactly 0 where exp(-x) overflows (as in the reference), also where an exp_u20 clamps its
  // result to FLT_MAX (1 / (1 + FLT_MAX) is not 0; see exp_clamped above for why that matters).
  const Vec r = (Vec(1.0f) + (Vec(0.0f) - x).exp_u20()).reciprocal();
  return Vec::blendv(Vec::blendv(r, Vec(0.0f), x < Vec(-88.7228394f)), x, x.isnan());
}

inline Vec tanh(const Vec& x) {
  // 1 - 2 / (1 + exp(2x)): +-1 at the ends (2 / (1 + FLT_MAX) rounds away against 1).
  const Vec r = Vec(1.0f) - Vec(2.0f) / (Vec(1.0f) + (x + x).exp_u20());
  return Vec::blendv(r, x, x.isnan());
}
#endif

}  // namespace
}  // namespace FASTMLSTM_ISA
}  // namespace cpu
}  // namespace fastmlstm
