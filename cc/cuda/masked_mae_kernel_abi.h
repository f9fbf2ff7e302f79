// What the host launchers (masked_mae_launch.cc, plain g++) and the device
// kernels (masked_mae_kernels.cu.cc, compiled device-only by clang or nvcc)
// agree on: the one kernel parameter block and the kernels' names.
//
// The kernels are `extern "C"` (unmangled), so their names are the same on
// both sides by construction and the host finds them in the loaded module with
// cuModuleGetFunction:
//   fused_masked_mae_fwd_<f16|bf16|f32|f64>_<dense|i32|i64>_g<G>   (forward)
//   fused_masked_mae_grad_<f16|bf16|f32|f64>_<dense|i32|i64>       (gradient)
//   fused_masked_ce_fwd_..._g<G>, fused_masked_ce_grad_...           (the masked
//                                                                    cross-entropy, same grid)
// G is the number of lanes per row (1, 2, 4, ..., 32), or 0 for one whole
// block per row; the gradient is a flat element-wise stream with one shape. Only the C++ standard library is used here, so both compilers
// accept it, and both lay KernelParams out identically (LP64, no bit-fields).
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_

#include <cstdint>
#include <string>

#include "cc/math/masked_ce_row.h"
#include "cc/math/masked_mae_row.h"

namespace fused_masked_mae {

// Passed by value to every kernel (about 2.1 KB, under CUDA's 4 KB limit).
struct KernelParams {
  const void* y_true;     // dense T [rows, num_classes], or int32/int64 ids [rows]
  const void* y_pred;     // T [rows, num_classes]
  const void* grad_loss;  // T [rows]; gradient kernels only
  void* out;              // loss T [rows], or grad_y_pred T [rows, num_classes]
  uint8_t* row_keep;      // forward: keep byte per row, written unless null; gradient: read
  int64_t rows;
  int64_t num_classes;
  MaskedTokenSet tokens;
  // The masked cross-entropy's kernels only: row_stats [rows, kCeRowStats]
  // (forward: written unless null; gradient: read) and the options.
  double* row_stats;
  CeOptions ce;
};

enum class TargetKind { kDense = 0, kInt32Ids = 1, kInt64Ids = 2 };

constexpr int kNumElementKinds = 4;  // ElementKind
constexpr int kNumTargetKinds = 3;
constexpr int kNumGroupSlots = 7;  // G = 1, 2, 4, 8, 16, 32, and 0 (whole block)
constexpr int kNumForwardKernels = kNumElementKinds * kNumTargetKinds * kNumGroupSlots;
constexpr int kNumMaeKernels = kNumForwardKernels + kNumElementKinds * kNumTargetKinds;
// The masked cross-entropy's kernels follow the masked MAE's, in the same order.
constexpr int kNumKernels = 2 * kNumMaeKernels;

// Slot of G in the list above; -1 for an unsupported G.
inline constexpr int GroupSlot(int group) {
  return group == 0 ? 6
         : group == 1 ? 0 : group == 2 ? 1 : group == 4 ? 2 : group == 8 ? 3
         : group == 16 ? 4 : group == 32 ? 5 : -1;
}

// Forward kernels first, then one gradient kernel per (dtype, targets).
inline constexpr int ForwardKernelIndex(ElementKind dtype, TargetKind targets, int group) {
  return (static_cast<int>(dtype) * kNumTargetKinds + static_cast<int>(targets)) *
             kNumGroupSlots +
         GroupSlot(group);
}

inline constexpr int GradientKernelIndex(ElementKind dtype, TargetKind targets) {
  return kNumForwardKernels + static_cast<int>(dtype) * kNumTargetKinds +
         static_cast<int>(targets);
}

inline constexpr int CeForwardKernelIndex(ElementKind dtype, TargetKind targets, int group) {
  return kNumMaeKernels + ForwardKernelIndex(dtype, targets, group);
}

inline constexpr int CeGradientKernelIndex(ElementKind dtype, TargetKind targets) {
  return kNumMaeKernels + GradientKernelIndex(dtype, targets);
}

// The kernel name of index `index` (host side only).
inline std::string KernelName(int index) {
  if (index >= kNumMaeKernels) {
    const std::string mae = KernelName(index - kNumMaeKernels);
    return "fused_masked_ce_" + mae.substr(std::string("fused_masked_mae_").size());
  }
  static const char* const kDtypes[] = {"f16", "bf16", "f32", "f64"};  // ElementKind order
  static const char* const kTargets[] = {"dense", "i32", "i64"};
  static const int kGroups[] = {1, 2, 4, 8, 16, 32, 0};
  if (index >= kNumForwardKernels) {
    const int k = index - kNumForwardKernels;
    return std::string("fused_masked_mae_grad_") + kDtypes[k / kNumTargetKinds] + "_" +
           kTargets[k % kNumTargetKinds];
  }
  const int slot = index % kNumGroupSlots;
  const int target = index / kNumGroupSlots % kNumTargetKinds;
  const int dtype = index / (kNumGroupSlots * kNumTargetKinds);
  return std::string("fused_masked_mae_fwd_") + kDtypes[dtype] + "_" + kTargets[target] + "_g" +
         std::to_string(kGroups[slot]);
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNEL_ABI_H_
