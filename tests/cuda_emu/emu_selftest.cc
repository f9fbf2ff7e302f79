// Kernels that break the rules the CUDA emulator checks (shim.h), one per
// mode, compiled like the real kernels (-include shim.h). tests/
// test_cuda_emulation.py runs each and expects the emulator's error; mode
// "ok" must pass. Usage: emu_selftest MODE
#include <cstdio>
#include <cstring>
#include <string>

#include "tests/cuda_emu/emu_runtime.h"

namespace {

const char* mode = "";
float data[64] __attribute__((aligned(16)));
float out[1024];

__global__ void Kernel() {
  const int lane = threadIdx.x % 32;
  const std::string m = mode;
  if (m == "ok") {
    float v = static_cast<float>(threadIdx.x);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __shared__ float s[32];
    if (lane == 0) s[threadIdx.x / 32] = v;
    __syncthreads();
    out[threadIdx.x] = s[0] + __shfl_sync(0xffffffffu, v, 3, 8) + __shfl_down_sync(0xffffffffu, v, 1);
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(data + 4));
    out[threadIdx.x] += static_cast<float>(x.x);
  } else if (m == "divergent_shuffle") {
    float v = 1.0f;
    if (lane < 16) {
      v = __shfl_xor_sync(0xffffffffu, v, 1);
    } else {
      v = __shfl_xor_sync(0xffffffffu, v, 2);
    }
    out[threadIdx.x] = v;
  } else if (m == "missing_lane") {  // a tail guard that skips the shuffle
    float v = 1.0f;
    if (threadIdx.x < 40) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
  } else if (m == "divergent_barrier") {
    if (threadIdx.x < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (m == "barrier_exit") {
    if (threadIdx.x == 0) return;
    __syncthreads();
  } else if (m == "misaligned_ldg") {
    const uint4 x = __ldg(reinterpret_cast<const uint4*>(data + 1));
    out[threadIdx.x] = static_cast<float>(x.x);
  } else if (m == "mask_excludes_self") {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
  }
}

void Entry(const void*) { Kernel(); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  mode = argv[1];
  cuda_emu::RunKernel("selftest", Entry, nullptr, 2, 64);
  std::printf("selftest %s: completed\n", mode);
  return 0;
}
