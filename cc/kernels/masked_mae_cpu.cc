// The CPU launchers (masked_mae_cpu.h): map rows onto the caller's thread
// pool and call the row routines of masked_mae_row.h. No TensorFlow here, so
// the same object serves every front door.
#include "cc/kernels/masked_mae_cpu.h"

#include <type_traits>

#include "cc/kernels/host_float16.h"

namespace fused_masked_mae {
namespace {

// The target row of `row`: dense values, or the class id of the sparse loss.
template <typename T, typename TargetT>
auto TargetRowAt(const TargetT* y_true, int64_t row, int64_t num_classes) {
  if constexpr (std::is_same_v<TargetT, T>) {
    return DenseRow(y_true + row * num_classes);
  } else {
    return SparseTargetRow{static_cast<int64_t>(y_true[row])};
  }
}

}  // namespace

template <typename T, typename TargetT>
void CpuMaskedMaeForward(const TargetT* y_true, const T* y_pred, int64_t rows,
                         int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                         uint8_t* row_keep, const ParallelFor& parallel_for) {
  parallel_for(rows, num_classes * kCpuCyclesPerElement, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint8_t keep;
      loss[row] = ComputeRowLoss(TargetRowAt<T>(y_true, row, num_classes),
                                 y_pred + row * num_classes, num_classes, tokens, &keep);
      if (row_keep != nullptr) row_keep[row] = keep;
    }
  });
}

template <typename T, typename TargetT>
void CpuMaskedMaeGradient(const TargetT* y_true, const T* y_pred, const uint8_t* row_keep,
                          const T* grad_loss, int64_t rows, int64_t num_classes,
                          T* grad_y_pred, const ParallelFor& parallel_for) {
  parallel_for(rows, num_classes * kCpuCyclesPerElement, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * num_classes;
      ComputeRowGradient(TargetRowAt<T>(y_true, row, num_classes), y_pred + offset, num_classes,
                         row_keep[row], grad_loss[row], grad_y_pred + offset);
    }
  });
}

#define INSTANTIATE_CPU_LAUNCHERS(T, TargetT)                                                \
  template void CpuMaskedMaeForward<T, TargetT>(const TargetT*, const T*, int64_t, int64_t,  \
                                                const MaskedTokenSet&, T*, uint8_t*,         \
                                                const ParallelFor&);                         \
  template void CpuMaskedMaeGradient<T, TargetT>(const TargetT*, const T*, const uint8_t*,   \
                                                 const T*, int64_t, int64_t, T*,             \
                                                 const ParallelFor&);
#define INSTANTIATE_CPU_DTYPE(T)      \
  INSTANTIATE_CPU_LAUNCHERS(T, T)       \
  INSTANTIATE_CPU_LAUNCHERS(T, int32_t) \
  INSTANTIATE_CPU_LAUNCHERS(T, int64_t)
INSTANTIATE_CPU_DTYPE(HostHalf)
INSTANTIATE_CPU_DTYPE(HostBFloat16)
INSTANTIATE_CPU_DTYPE(float)
INSTANTIATE_CPU_DTYPE(double)
#undef INSTANTIATE_CPU_DTYPE
#undef INSTANTIATE_CPU_LAUNCHERS

}  // namespace fused_masked_mae
