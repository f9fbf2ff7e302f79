// The CPU launchers for x86-64 CPUs with AVX-512 F/BW/DQ/VL (x86-64-v4:
// Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later) in 512-bit vectors,
// chosen at load by masked_mae_cpu.cc: one zmm register holds the 16 float32
// lanes of the row scan. f16 -> f32 uses AVX-512F's vcvtph2ps. The AVX512-BF16
// instruction vcvtneps2bf16 is deliberately not used: it flushes denormals, so
// its float32 -> bfloat16 results differ from the round-to-nearest-even of
// host_float16.h (the integer rounding vectorizes as well). See
// masked_mae_cpu_avx2.cc for why the target is set by pragma.
#if defined(__x86_64__)
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <immintrin.h>

#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#define FUSED_MASKED_MAE_CPU_VARIANT avx512
#define FUSED_MASKED_MAE_HOST_F16C 1
#define FUSED_MASKED_MAE_HOST_AVX512 1
#include "cc/cpu/masked_mae_cpu_variant.h"
#endif
