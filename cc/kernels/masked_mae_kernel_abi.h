// What the host launchers (masked_mae_launch.cc, plain g++) and the device
// kernels (masked_mae_kernels.cu.cc, compiled device-only by clang or nvcc)
// agree on: the one kernel parameter block and the kernels' names.
//
// The kernels are `extern "C"` (unmangled), so their names are the same on
// both sides by construction and the host finds them in the loaded module with
// cuModuleGetFunction:
//   fused_masked_mae_<fwd|grad>_<f16|bf16|f32|f64>_<dense|i32|i64>_g<G>
// G is the number of lanes per row (1, 2, 4, ..., 32), or 0 for one whole
// block per row. Only the C++ standard library is used here, so both compilers
// accept it, and both lay KernelParams out identically (LP64, no bit-fields).
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_

#include <cstdint>
#include <string>

#include "cc/kernels/masked_mae_row.h"

namespace fused_masked_mae {

// Passed by value to every kernel (about 2.1 KB, under CUDA's 4 KB limit).
struct KernelParams {
  const void* y_true;     // dense T [rows, num_classes], or int32/int64 ids [rows]
  const void* y_pred;     // T [rows, num_classes]
  const void* grad_loss;  // T [rows]; gradient kernels only
  void* out;              // loss T [rows], or grad_y_pred T [rows, num_classes]
  int64_t rows;
  int64_t num_classes;
  MaskedTokenSet tokens;
};

enum class TargetKind { kDense = 0, kInt32Ids = 1, kInt64Ids = 2 };

constexpr int kNumElementKinds = 4;  // ElementKind
constexpr int kNumTargetKinds = 3;
constexpr int kNumGroupSlots = 7;  // G = 1, 2, 4, 8, 16, 32, and 0 (whole block)
constexpr int kNumKernels = 2 * kNumElementKinds * kNumTargetKinds * kNumGroupSlots;

// Slot of G in the list above; -1 for an unsupported G.
inline constexpr int GroupSlot(int group) {
  return group == 0 ? 6
         : group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : group == 8 ? 3
         : group == 16 ? 4 : group == 32 ? 5 : -1;
}

inline constexpr int KernelIndex(bool gradient, ElementKind dtype, TargetKind targets,
                                 int group) {
  return ((static_cast<int>(gradient) * kNumElementKinds + static_cast<int>(dtype)) *
              kNumTargetKinds +
          static_cast<int>(targets)) *
             kNumGroupSlots +
         GroupSlot(group);
}

// The kernel name for KernelIndex(...) == index (host side only).
inline std::string KernelName(int index) {
  static const char* const kDtypes[] = {"f16", "bf16", "f32", "f64"};  // ElementKind order
  static const char* const kTargets[] = {"dense", "i32", "i64"};
  static const int kGroups[] = {1, 2, 4, 8, 16, 32, 0};
  const int slot = index % kNumGroupSlots;
  const int target = index / kNumGroupSlots % kNumTargetKinds;
  const int dtype = index / (kNumGroupSlots * kNumTargetKinds) % kNumElementKinds;
  const bool gradient = index / (kNumGroupSlots * kNumTargetKinds * kNumElementKinds) != 0;
  return std::string("fused_masked_mae_") + (gradient ? "grad_" : "fwd_") + kDtypes[dtype] +
         "_" + kTargets[target] + "_g" + std::to_string(kGroups[slot]);
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_
