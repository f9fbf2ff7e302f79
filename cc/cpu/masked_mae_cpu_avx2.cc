// The CPU launchers for x86-64 CPUs with AVX2, FMA and F16C (x86-64-v3's
// vector units; Haswell, Zen and later), chosen at load by masked_mae_cpu.cc.
// The target is switched here, after the standard headers, not with -m flags,
// so that no code shared with other objects is compiled for it (see
// masked_mae_cpu_variant.h). -ffp-contract=off (build.sh) keeps FMA out of
// the arithmetic: results are bit-identical to the baseline variant's.
#if defined(__x86_64__)
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <immintrin.h>

#pragma GCC target("avx2,fma,f16c")
#define FUSED_MASKED_MAE_CPU_VARIANT avx2
#define FUSED_MASKED_MAE_HOST_F16C 1
#include "cc/cpu/masked_mae_cpu_variant.h"
#endif
