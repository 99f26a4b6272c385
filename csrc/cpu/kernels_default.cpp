// The epilogues of mlstm_cpu_kernels.h compiled for the compiler's baseline instruction set: the
// fallback on any CPU (and the only copy off x86-64).
#define FASTMLSTM_ISA isa_default
#include "mlstm_cpu_kernels.h"
