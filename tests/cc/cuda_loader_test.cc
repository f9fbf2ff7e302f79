// Drives cc/cuda/cuda_driver.cc and the launchers against tests/cc/fake_libcuda.c
// (tests/test_cuda_loader.py): `cuda_loader_test launch N` launches the f32
// forward N times on fake pointers, `cuda_loader_test preload` preloads device
// 0; each prints "ok" or the error message.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cc/cuda/cuda_driver.h"
#include "cc/cuda/masked_mae_cuda.h"

using namespace fused_masked_mae;

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  cuda::ScopedDevice device(0);
  if (device.status() != CUDA_SUCCESS) {
    std::printf("device: %s\n", cuda::ErrorMessage(device.status()).c_str());
    return 1;
  }
  if (std::strcmp(argv[1], "preload") == 0) {
    const CUresult r = cuda::Preload(0);
    std::printf("preload: %s\n", r == CUDA_SUCCESS ? "ok" : cuda::ErrorMessage(r).c_str());
    return 0;
  }
  const int n = argc > 2 ? std::atoi(argv[2]) : 1;
  MaskedTokenSet tokens{};
  for (int k = 0; k < n; ++k) {
    const CUresult r = LaunchMaskedMaeForward<float>(
        reinterpret_cast<const float*>(0x10000), reinterpret_cast<const float*>(0x20000), 4096,
        1549, tokens, reinterpret_cast<float*>(0x30000), nullptr, nullptr);
    std::printf("launch %d: %s\n", k, r == CUDA_SUCCESS ? "ok" : cuda::ErrorMessage(r).c_str());
  }
  return 0;
}
