// __nv_bfloat16 for the CUDA emulator: the host bfloat16 type of
// cc/math/host_float16.h (round to nearest even), as a distinct type like CUDA's.
#ifndef FUSED_MASKED_MAE_CUDA_EMU_CUDA_BF16_H_
#define FUSED_MASKED_MAE_CUDA_EMU_CUDA_BF16_H_

#include "cc/math/host_float16.h"
#include "cuda_fp16.h"

struct __nv_bfloat16 {
  fused_masked_mae::HostBFloat16 h;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : h(f) {}
  __nv_bfloat16(int i) : h(static_cast<float>(i)) {}
  operator float() const { return static_cast<float>(h); }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");

#endif  // FUSED_MASKED_MAE_CUDA_EMU_CUDA_BF16_H_
