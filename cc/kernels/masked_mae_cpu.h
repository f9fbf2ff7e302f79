// TensorFlow-free CPU launchers: the one entry to the host row loops for every
// front door (the TensorFlow CPU kernels, the XLA CPU handlers and _core).
//
// Inputs are row-major [rows, num_classes]. Callers validate before calling:
// shapes, num_classes > 0, token ids < num_classes, sparse ids in [0, C),
// rows * num_classes fits int64. T is float, double, HostHalf or HostBFloat16
// (host_float16.h); TargetT is T (dense targets) or int32_t/int64_t (class ids
// standing for one_hot(ids)).
//
// Each row is computed by one thread with a fixed reduction order, so the
// results do not depend on how `parallel_for` splits the rows.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_

#include <cstdint>
#include <functional>

#include "cc/kernels/masked_mae_row.h"

namespace fused_masked_mae {

// Calls body(begin, end) over disjoint ranges covering [0, rows), possibly on
// several threads, and returns when all are done. cost_per_row is a rough
// cycle count that a thread pool can use to size its shards.
using RowRangeBody = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor =
    std::function<void(int64_t rows, int64_t cost_per_row, const RowRangeBody& body)>;

// Runs every row on the calling thread.
inline void SerialFor(int64_t rows, int64_t, const RowRangeBody& body) {
  if (rows > 0) body(0, rows);
}

// Rough cycles per element of one row, for sharding.
constexpr int64_t kCpuCyclesPerElement = 8;

// loss[rows]; row_keep[rows] (may be null) receives each row's keep byte
// (1 = counted, 0 = masked), which the gradient takes instead of re-deriving
// the argmaxes.
template <typename T, typename TargetT>
void CpuMaskedMaeForward(const TargetT* y_true, const T* y_pred, int64_t rows,
                         int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                         uint8_t* row_keep, const ParallelFor& parallel_for);

// grad_y_pred[rows, num_classes] = d loss / d y_pred from the forward's
// row_keep and the upstream gradient grad_loss[rows]. One pass over the
// inputs; d loss / d y_true is its negative.
template <typename T, typename TargetT>
void CpuMaskedMaeGradient(const TargetT* y_true, const T* y_pred, const uint8_t* row_keep,
                          const T* grad_loss, int64_t rows, int64_t num_classes,
                          T* grad_y_pred, const ParallelFor& parallel_for);

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_
