// The CUDA emulator's runtime interface for the test harness (emu_test.cc).
#ifndef FUSED_MASKED_MAE_CUDA_EMU_RUNTIME_H_
#define FUSED_MASKED_MAE_CUDA_EMU_RUNTIME_H_

#include <cstdint>
#include <map>

namespace cuda_emu {

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0, shuffles = 0, barriers = 0,
           checked_loads = 0;
  std::map<int, uint64_t> launches_by_kernel;  // by kernel index (masked_mae_kernel_abi.h)
};

Stats& GetStats();

// Runs entry(args) once per thread of a grid x block launch (1-D), block after block.
void RunKernel(const char* name, void (*entry)(const void*), const void* args, unsigned grid,
               unsigned block);

// getenv as an int, `fallback` when unset or empty.
int EnvInt(const char* name, int fallback);

}  // namespace cuda_emu

#endif  // FUSED_MASKED_MAE_CUDA_EMU_RUNTIME_H_
