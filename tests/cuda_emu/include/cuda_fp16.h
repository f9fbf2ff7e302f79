// __half for the CUDA emulator: the host float16 type of cc/math/host_float16.h
// (round to nearest even, exact widening), as a distinct type like CUDA's.
#ifndef FUSED_MASKED_MAE_CUDA_EMU_CUDA_FP16_H_
#define FUSED_MASKED_MAE_CUDA_EMU_CUDA_FP16_H_

#include "cc/math/host_float16.h"

struct __half {
  fused_masked_mae::HostHalf h;
  __half() = default;
  __half(float f) : h(f) {}
  __half(int i) : h(static_cast<float>(i)) {}
  operator float() const { return static_cast<float>(h); }
};
static_assert(sizeof(__half) == 2, "__half is 2 bytes");

#endif  // FUSED_MASKED_MAE_CUDA_EMU_CUDA_FP16_H_
