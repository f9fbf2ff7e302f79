// The body of one instruction-set variant of the CPU launchers: the row loops
// of masked_mae_row.h mapped onto the caller's ParallelFor, for every dtype
// and target kind, exported as an FmmCpuKernels table (masked_mae_cpu_abi.h).
//
// Included once by each of masked_mae_cpu_{baseline,avx2,avx512}.cc, which
// define FUSED_MASKED_MAE_CPU_VARIANT (the variant's name) and, for the x86
// ones, switch the target with `#pragma GCC target` just before including it.
// Everything this file defines and everything it pulls in from the row headers
// lives in the namespace fused_masked_mae_cpu_<variant>: `fused_masked_mae` is
// a macro here, so that inline functions and template instances of different
// variants have different symbol names and can never be merged by the linker.
// The standard headers are included first, under the baseline target.
#ifndef FUSED_MASKED_MAE_CPU_VARIANT
#error "define FUSED_MASKED_MAE_CPU_VARIANT (baseline, avx2 or avx512) first"
#endif
#ifdef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_ROW_H_
#error "masked_mae_cpu_variant.h must be the first include of the row headers in its file"
#endif

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cc/cpu/masked_mae_cpu_abi.h"

#define FUSED_MASKED_MAE_CPU_CAT2(a, b) a##b
#define FUSED_MASKED_MAE_CPU_CAT(a, b) FUSED_MASKED_MAE_CPU_CAT2(a, b)
#define FUSED_MASKED_MAE_CPU_STR2(a) #a
#define FUSED_MASKED_MAE_CPU_STR(a) FUSED_MASKED_MAE_CPU_STR2(a)
#define fused_masked_mae FUSED_MASKED_MAE_CPU_CAT(fused_masked_mae_cpu_, FUSED_MASKED_MAE_CPU_VARIANT)

#include "cc/math/host_float16.h"
#include "cc/math/masked_mae_row.h"
#include "cc/math/masked_ce_row.h"

namespace fused_masked_mae {
namespace {

// The cost of a row in cycles, for the thread pool's sharding (Eigen's cost
// model: one shard per ~40k cycles, a second thread from ~110k cycles of
// work). Measured here (callgrind, AVX2): the vector row loops retire 2-6
// instructions per element, a core streams float32 at about one element pair
// per 1-2 cycles, and each row costs a fixed ~300 instructions (reductions,
// argmax search, tokens, loss). So ~2 cycles per element plus ~100 per row:
// short rows are costed by their overhead, and small inputs stay on one thread
// instead of waking another for a few microseconds of work.
constexpr int64_t kCyclesPerElement = 2;
constexpr int64_t kCyclesPerRow = 100;

// The target row of `row`: dense values, or the class id of the sparse loss.
template <typename T, typename TargetT>
auto TargetRowAt(const TargetT* y_true, int64_t row, int64_t num_classes) {
  if constexpr (std::is_same_v<TargetT, T>) {
    return DenseRow(y_true + row * num_classes);
  } else {
    return SparseTargetRow{static_cast<int64_t>(y_true[row])};
  }
}

template <typename Body>
void RunBody(void* body, int64_t begin, int64_t end) {
  (*static_cast<const Body*>(body))(begin, end);
}

template <typename Body>
void ParallelRows(FmmParallelFor parallel_for, const void* ctx, int64_t rows,
                  int64_t num_classes, const Body& body) {
  parallel_for(ctx, rows, num_classes * kCyclesPerElement + kCyclesPerRow, &RunBody<Body>,
               const_cast<Body*>(&body));
}

template <typename T, typename TargetT>
void Forward(const void* y_true_v, const void* y_pred_v, int64_t rows, int64_t num_classes,
             const void* tokens_v, void* loss_v, uint8_t* row_keep, FmmParallelFor parallel_for,
             const void* ctx) {
  const auto* y_true = static_cast<const TargetT*>(y_true_v);
  const auto* y_pred = static_cast<const T*>(y_pred_v);
  auto* loss = static_cast<T*>(loss_v);
  const auto& tokens = *static_cast<const MaskedTokenSet*>(tokens_v);
  ParallelRows(parallel_for, ctx, rows, num_classes, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint8_t keep;
      loss[row] = ComputeRowLoss(TargetRowAt<T>(y_true, row, num_classes),
                                 y_pred + row * num_classes, num_classes, tokens, &keep);
      if (row_keep != nullptr) row_keep[row] = keep;
    }
  });
}

template <typename T, typename TargetT>
void Gradient(const void* y_true_v, const void* y_pred_v, const uint8_t* row_keep,
              const void* grad_loss_v, int64_t rows, int64_t num_classes, void* grad_v,
              FmmParallelFor parallel_for, const void* ctx) {
  const auto* y_true = static_cast<const TargetT*>(y_true_v);
  const auto* y_pred = static_cast<const T*>(y_pred_v);
  const auto* grad_loss = static_cast<const T*>(grad_loss_v);
  auto* grad_y_pred = static_cast<T*>(grad_v);
  ParallelRows(parallel_for, ctx, rows, num_classes, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * num_classes;
      ComputeRowGradient(TargetRowAt<T>(y_true, row, num_classes), y_pred + offset, num_classes,
                         row_keep[row], grad_loss[row], grad_y_pred + offset);
    }
  });
}

// The masked cross-entropy's row loops (masked_ce_row.h), on the same rows.
// A row costs about twice the masked MAE's (a second pass over the cached
// row with an exp or log per element).
template <typename Body>
void ParallelCeRows(FmmParallelFor parallel_for, const void* ctx, int64_t rows,
                    int64_t num_classes, const Body& body) {
  parallel_for(ctx, rows, num_classes * 4 * kCyclesPerElement + kCyclesPerRow, &RunBody<Body>,
               const_cast<Body*>(&body));
}

template <typename T, typename TargetT>
void CeForward(const void* y_true_v, const void* y_pred_v, int64_t rows, int64_t num_classes,
               const void* tokens_v, const void* options_v, void* loss_v, uint8_t* row_keep,
               double* row_stats, FmmParallelFor parallel_for, const void* ctx) {
  const auto* y_true = static_cast<const TargetT*>(y_true_v);
  const auto* y_pred = static_cast<const T*>(y_pred_v);
  auto* loss = static_cast<T*>(loss_v);
  const auto& tokens = *static_cast<const MaskedTokenSet*>(tokens_v);
  const auto constants =
      MakeCeConstants<T>(*static_cast<const CeOptions*>(options_v), num_classes);
  ParallelCeRows(parallel_for, ctx, rows, num_classes, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      uint8_t keep;
      double stats[kCeRowStats];
      loss[row] = ComputeCeRowLoss(TargetRowAt<T>(y_true, row, num_classes),
                                   y_pred + row * num_classes, num_classes, tokens, constants,
                                   &keep, stats);
      if (row_keep != nullptr) row_keep[row] = keep;
      if (row_stats != nullptr) {
        for (int k = 0; k < kCeRowStats; ++k) row_stats[row * kCeRowStats + k] = stats[k];
      }
    }
  });
}

template <typename T, typename TargetT>
void CeGradient(const void* y_true_v, const void* y_pred_v, const uint8_t* row_keep,
                const double* row_stats, const void* grad_loss_v, int64_t rows,
                int64_t num_classes, const void* options_v, void* grad_v,
                FmmParallelFor parallel_for, const void* ctx) {
  const auto* y_true = static_cast<const TargetT*>(y_true_v);
  const auto* y_pred = static_cast<const T*>(y_pred_v);
  const auto* grad_loss = static_cast<const T*>(grad_loss_v);
  auto* grad_y_pred = static_cast<T*>(grad_v);
  const auto constants =
      MakeCeConstants<T>(*static_cast<const CeOptions*>(options_v), num_classes);
  ParallelCeRows(parallel_for, ctx, rows, num_classes, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * num_classes;
      ComputeCeRowGradient(TargetRowAt<T>(y_true, row, num_classes), y_pred + offset,
                           num_classes, constants, row_keep[row], row_stats + row * kCeRowStats,
                           grad_loss[row], grad_y_pred + offset);
    }
  });
}

template <typename F>
void DetMath(const void* x_v, int64_t n, void* exp_v, void* log_v) {
  const auto* x = static_cast<const F*>(x_v);
  auto* e = static_cast<F*>(exp_v);
  auto* g = static_cast<F*>(log_v);
  for (int64_t i = 0; i < n; ++i) e[i] = DetExp(x[i]);
  for (int64_t i = 0; i < n; ++i) g[i] = DetLog(x[i]);
}

#define FUSED_MASKED_MAE_CPU_CE_ROW(T) \
  {&CeForward<T, T>, &CeForward<T, int32_t>, &CeForward<T, int64_t>}
#define FUSED_MASKED_MAE_CPU_CE_GRAD_ROW(T) \
  {&CeGradient<T, T>, &CeGradient<T, int32_t>, &CeGradient<T, int64_t>}

#define FUSED_MASKED_MAE_CPU_ROW(T) \
  {&Forward<T, T>, &Forward<T, int32_t>, &Forward<T, int64_t>}
#define FUSED_MASKED_MAE_CPU_GRAD_ROW(T) \
  {&Gradient<T, T>, &Gradient<T, int32_t>, &Gradient<T, int64_t>}
static_assert(static_cast<int>(ElementKind::kFloat16) == 0 &&
                  static_cast<int>(ElementKind::kBFloat16) == 1 &&
                  static_cast<int>(ElementKind::kFloat32) == 2 &&
                  static_cast<int>(ElementKind::kFloat64) == 3,
              "FmmCpuKernels rows follow ElementKind");
const FmmCpuKernels kKernels = {
    FUSED_MASKED_MAE_CPU_STR(FUSED_MASKED_MAE_CPU_VARIANT),
    {FUSED_MASKED_MAE_CPU_ROW(HostHalf), FUSED_MASKED_MAE_CPU_ROW(HostBFloat16),
     FUSED_MASKED_MAE_CPU_ROW(float), FUSED_MASKED_MAE_CPU_ROW(double)},
    {FUSED_MASKED_MAE_CPU_GRAD_ROW(HostHalf), FUSED_MASKED_MAE_CPU_GRAD_ROW(HostBFloat16),
     FUSED_MASKED_MAE_CPU_GRAD_ROW(float), FUSED_MASKED_MAE_CPU_GRAD_ROW(double)},
    {FUSED_MASKED_MAE_CPU_CE_ROW(HostHalf), FUSED_MASKED_MAE_CPU_CE_ROW(HostBFloat16),
     FUSED_MASKED_MAE_CPU_CE_ROW(float), FUSED_MASKED_MAE_CPU_CE_ROW(double)},
    {FUSED_MASKED_MAE_CPU_CE_GRAD_ROW(HostHalf), FUSED_MASKED_MAE_CPU_CE_GRAD_ROW(HostBFloat16),
     FUSED_MASKED_MAE_CPU_CE_GRAD_ROW(float), FUSED_MASKED_MAE_CPU_CE_GRAD_ROW(double)},
    {&DetMath<float>, &DetMath<double>},
};
#undef FUSED_MASKED_MAE_CPU_ROW
#undef FUSED_MASKED_MAE_CPU_GRAD_ROW
#undef FUSED_MASKED_MAE_CPU_CE_ROW
#undef FUSED_MASKED_MAE_CPU_CE_GRAD_ROW

}  // namespace
}  // namespace fused_masked_mae

extern "C" const FmmCpuKernels* FUSED_MASKED_MAE_CPU_CAT(fused_masked_mae_cpu_kernels_,
                                                         FUSED_MASKED_MAE_CPU_VARIANT)(void) {
  return &fused_masked_mae::kKernels;
}
