// The CUDA driver, loaded at run time: no CUDA runtime, no link-time
// dependency on libcuda. The device code (cubins per architecture and PTX,
// built by tools/build_device_code.sh) is embedded in the library that links
// this file and loaded once per CUDA context with cuModuleLoadData.
//
// Minimum driver: CUDA 12.0, i.e. NVIDIA r525 (cuDriverGetVersion() >= 12000).
// The cubins are ELF ABI 7 (CUDA 12 ptxas) and the PTX is ISA 8.0, both of
// which r525 loads; see README, "CUDA runtime".
#ifndef FUSED_MASKED_MAE_CC_KERNELS_CUDA_DRIVER_H_
#define FUSED_MASKED_MAE_CC_KERNELS_CUDA_DRIVER_H_

#include <cuda.h>

#include <cstdint>
#include <string>

#include "cc/cuda/masked_mae_kernel_abi.h"

namespace fused_masked_mae {
namespace cuda {

constexpr int kMinimumDriverVersion = 12000;  // CUDA 12.0 (r525)

enum class DriverState { kMissing, kTooOld, kOk };

// kMissing for version <= 0 (no libcuda, or cuDriverGetVersion failed),
// kTooOld below kMinimumDriverVersion.
DriverState ClassifyDriverVersion(int version);

struct DriverStatus {
  DriverState state;
  int version;          // cuDriverGetVersion(), 0 when there is no driver
  std::string message;  // why the GPU kernels cannot run; empty when kOk
};

// Loads libcuda.so.1 on first call (thread-safe) and reads its version; no
// cuInit, no context. FUSED_MASKED_MAE_FAKE_CUDA_DRIVER_VERSION=<int>
// replaces the version read (tests of the driver floor; 0 = no driver).
const DriverStatus& Driver();

// "12.0" for 12000.
std::string VersionString(int version);

// The message for a driver below the minimum: what was found and what to upgrade.
std::string TooOldMessage(int version);

// Launches kernel `kernel_index` (masked_mae_kernel_abi.h) with a 1-D grid on
// `stream` (its context's module, loaded on first use in that context; the
// legacy/per-thread default streams use the current context).
CUresult LaunchKernel(int kernel_index, uint32_t grid, uint32_t block, const KernelParams& params,
                      CUstream stream);

// Loads the device code into `device`'s primary context now; it is
// otherwise loaded at the first launch in a context. For CUDA graph capture:
// call it before capturing launches (a module load, and the JIT compile of
// the PTX on GPUs without a cubin, cannot happen inside a capture).
CUresult Preload(int device);

// The number of streaming multiprocessors of `stream`'s device (cached per
// device), for launch shapes that fill the GPU.
CUresult MultiprocessorCount(CUstream stream, int* count);

// The number of GPUs the driver sees (cuDeviceGetCount).
CUresult DeviceCount(int* count);

// The driver's name and text for `result`, plus what this file found out about
// the last failure on this thread (missing driver, no image for the GPU, ...).
std::string ErrorMessage(CUresult result);

// Makes `device`'s primary context current on this thread for the object's
// lifetime (the TensorFlow-free core runs on its arrays' device this way).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  CUresult status() const { return status_; }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  CUresult status_;
  CUdevice device_ = 0;
  bool retained_ = false, pushed_ = false;
};

// The device ordinal of device memory at `ptr` (cuPointerGetAttribute).
CUresult PointerDevice(uintptr_t ptr, int* device);

// The device ordinal of `stream`'s context (the current context for the
// default streams 0, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD).
CUresult StreamDevice(CUstream stream, int* device);

}  // namespace cuda
}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_CUDA_DRIVER_H_
