// The epilogues of mlstm_cpu_kernels.h compiled for AVX-512 (F, BW, VL, DQ, with FMA and F16C;
// x86-64 only). The driver calls them only when ATen itself runs AVX-512 kernels on this CPU
// (at::get_cpu_capability() == "AVX512", which needs the same extensions), so no instruction here
// is ever reached on a CPU without them.
//
// As in kernels_avx2.cpp: the target is switched on for this translation unit alone, with ATen's
// CPU_CAPABILITY_AVX512 so that at::vec uses its 512-bit implementation (in at::vec::AVX512, apart
// from the other copies'); the driver's translation units and the other copies are linked first.
// The 16-bit conversions are ATen's integer rounding (round to nearest even, NaN kept), not the
// AVX-512-BF16 instruction, which flushes subnormals: every copy stores the same bits.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
// A target pragma does not define the ISA macros -mavx512f would; sleef.h declares its 512-bit
// functions (which at::vec's AVX-512 code calls) only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FASTMLSTM_ISA isa_avx512
#include "mlstm_cpu_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
