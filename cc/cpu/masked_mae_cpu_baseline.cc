// The CPU launchers for any CPU of the architecture (x86-64: SSE2), compiled
// with the build's own flags. See masked_mae_cpu_variant.h.
#define FUSED_MASKED_MAE_CPU_VARIANT baseline
#include "cc/cpu/masked_mae_cpu_variant.h"
