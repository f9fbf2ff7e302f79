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
// results do not depend on how `parallel_for` splits the rows. Every range of
// rows runs with denormals flushed to zero (TensorFlow's semantics, see
// denormal_flush.h), whatever the calling thread's floating-point mode.
//
// The row loops exist in several instruction-set variants (baseline x86-64,
// AVX2+FMA+F16C, AVX-512; baseline only elsewhere), the same source compiled
// for each target; the best one the CPU supports is chosen once per process,
// or the one FUSED_MASKED_MAE_CPU_ISA names. All give bit-identical results.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cc/math/masked_mae_row.h"

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

// The environment variable that forces a variant: baseline, avx2 or avx512.
constexpr char kCpuIsaEnvironmentVariable[] = "FUSED_MASKED_MAE_CPU_ISA";

// The variant in use ("baseline", "avx2" or "avx512"); the variants this CPU
// supports, comma-separated; and "" or, when FUSED_MASKED_MAE_CPU_ISA names an
// unknown or unsupported variant, why it was refused (the best supported
// variant runs instead: front doors report the error, the Python package at
// import). The choice is made on the first call of any of these or of a launcher.
const char* CpuIsa();
const char* CpuIsasSupported();
const char* CpuIsaError();

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

// The token rule of every C++ front door (python/fused_masked_mae/tokens.py
// states the same rule for the Python ones, which reach these with distinct
// ids): each id is in [0, num_classes); repeated ids count once; at most
// kMaxMaskedTokens distinct ids. Builds the token set, in order of first
// appearance, and returns "" or the message naming what is wrong.
// num_classes < 0 means "not known yet" (the TensorFlow kernel's
// construction): then only ids < 0 are out of range.
inline std::string MakeMaskedTokenSet(const int64_t* ids, size_t count, int64_t num_classes,
                                      MaskedTokenSet* tokens) {
  *tokens = MaskedTokenSet{};
  for (size_t k = 0; k < count; ++k) {
    if (ids[k] < 0 || (num_classes >= 0 && ids[k] >= num_classes)) {
      if (num_classes < 0) {
        return "masked token id " + std::to_string(ids[k]) + " is negative: class ids are >= 0";
      }
      return "masked token id " + std::to_string(ids[k]) + " is outside [0, " +
             std::to_string(num_classes) + ") for inputs with " + std::to_string(num_classes) +
             " classes";
    }
  }
  std::vector<int64_t> distinct(ids, ids + count);
  std::sort(distinct.begin(), distinct.end());
  const size_t num_distinct =
      static_cast<size_t>(std::unique(distinct.begin(), distinct.end()) - distinct.begin());
  if (num_distinct > static_cast<size_t>(kMaxMaskedTokens)) {
    return "got " + std::to_string(num_distinct) +
           " distinct masked token ids, but the fused op supports at most " +
           std::to_string(kMaxMaskedTokens);
  }
  for (size_t k = 0; k < count; ++k) {
    if (!tokens->Contains(ids[k])) tokens->ids[tokens->count++] = ids[k];
  }
  return "";
}

// Sparse ids are host memory on the CPU, so every CPU front door rejects an id
// outside [0, num_classes) before launching (the GPU kernels give NaN instead).
// Returns the message naming the first such id, or "" when all are valid.
template <typename Id>
std::string InvalidClassIdMessage(const Id* ids, int64_t count, int64_t num_classes) {
  for (int64_t i = 0; i < count; ++i) {
    if (ids[i] < 0 || ids[i] >= num_classes) {
      return "y_true_ids[" + std::to_string(i) + "] (flat index) = " + std::to_string(ids[i]) +
             " is outside [0, " + std::to_string(num_classes) + ") for y_pred with " +
             std::to_string(num_classes) + " classes";
    }
  }
  return "";
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_H_
