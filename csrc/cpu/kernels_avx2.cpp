// The epilogues of mlstm_cpu_kernels.h compiled for AVX2 + FMA + F16C (x86-64 only). The driver
// calls them only when ATen itself runs AVX2 or AVX-512 kernels on this CPU (at::get_cpu_capability),
// so no instruction here is ever reached on a CPU without them.
//
// The target is switched on for this translation unit alone (the rest of the library keeps the
// baseline), with ATen's CPU_CAPABILITY_AVX2 so that at::vec uses its AVX2 implementation. Its
// vector types then live in at::vec::AVX2, apart from the baseline copy's. The driver's translation
// units (mlstm_cpu.cpp first, then pack.cpp, forward.cpp, backward.cpp) and kernels_default.cpp are
// linked before this one, so inline functions that both copies instantiate resolve to the baseline
// code.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#endif
// A target pragma does not define the ISA macros -mavx2 would; sleef.h declares its 256-bit
// functions (which at::vec's AVX2 exp and tanh call) only under __AVX__.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTMLSTM_ISA isa_avx2
#include "mlstm_cpu_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
