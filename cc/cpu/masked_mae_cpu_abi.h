// The plain-C boundary between the CPU launchers' dispatcher (masked_mae_cpu.cc)
// and their instruction-set variants (masked_mae_cpu_{baseline,avx2,avx512}.cc).
//
// Each variant compiles the same row code (masked_mae_row.h) for its own
// target, inside a namespace of its own, so no inline function of one variant
// can be merged by the linker with another's (which would run AVX-512 code on
// a CPU without it, or baseline code in the AVX-512 path). What crosses the
// boundary is therefore C: void pointers to the caller's arrays, plain function
// pointers, and this table. Nothing here has an inline body.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_ABI_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_ABI_H_

#include <stdint.h>

extern "C" {

// Element dtypes, in fused_masked_mae::ElementKind order: float16, bfloat16,
// float32, float64. Targets: dense (the element dtype), int32 ids, int64 ids.
enum { kFmmCpuDtypes = 4, kFmmCpuTargets = 3 };

// The caller's ParallelFor, seen from a variant: runs body(body_ctx, begin,
// end) over disjoint ranges covering [0, rows) and returns when all are done.
typedef void (*FmmRowBody)(void* body_ctx, int64_t begin, int64_t end);
typedef void (*FmmParallelFor)(const void* ctx, int64_t rows, int64_t cost_per_row,
                               FmmRowBody body, void* body_ctx);

// tokens points to a fused_masked_mae::MaskedTokenSet (the same layout in
// every variant). Arrays are as in masked_mae_cpu.h.
typedef void (*FmmCpuForward)(const void* y_true, const void* y_pred, int64_t rows,
                              int64_t num_classes, const void* tokens, void* loss,
                              uint8_t* row_keep, FmmParallelFor parallel_for,
                              const void* parallel_for_ctx);
typedef void (*FmmCpuGradient)(const void* y_true, const void* y_pred, const uint8_t* row_keep,
                               const void* grad_loss, int64_t rows, int64_t num_classes,
                               void* grad_y_pred, FmmParallelFor parallel_for,
                               const void* parallel_for_ctx);

// The masked cross-entropy (masked_ce_row.h): options points to a
// fused_masked_mae::CeOptions; row_stats holds kCeRowStats float64 per row.
typedef void (*FmmCpuCeForward)(const void* y_true, const void* y_pred, int64_t rows,
                                int64_t num_classes, const void* tokens, const void* options,
                                void* loss, uint8_t* row_keep, double* row_stats,
                                FmmParallelFor parallel_for, const void* parallel_for_ctx);
typedef void (*FmmCpuCeGradient)(const void* y_true, const void* y_pred, const uint8_t* row_keep,
                                 const double* row_stats, const void* grad_loss, int64_t rows,
                                 int64_t num_classes, const void* options, void* grad_y_pred,
                                 FmmParallelFor parallel_for, const void* parallel_for_ctx);
// DetExp and DetLog (det_exp_log.h) over n elements, for tests: [float32, float64].
typedef void (*FmmCpuDetMath)(const void* x, int64_t n, void* exp_out, void* log_out);

typedef struct {
  const char* name;  // "baseline", "avx2", "avx512"
  FmmCpuForward forward[kFmmCpuDtypes][kFmmCpuTargets];
  FmmCpuGradient gradient[kFmmCpuDtypes][kFmmCpuTargets];
  FmmCpuCeForward ce_forward[kFmmCpuDtypes][kFmmCpuTargets];
  FmmCpuCeGradient ce_gradient[kFmmCpuDtypes][kFmmCpuTargets];
  FmmCpuDetMath det_math[2];
} FmmCpuKernels;

// One per variant; the x86 ones exist on x86-64 only. Hidden: internal to
// each library that links them.
#define FUSED_MASKED_MAE_CPU_HIDDEN __attribute__((visibility("hidden")))
FUSED_MASKED_MAE_CPU_HIDDEN const FmmCpuKernels* fused_masked_mae_cpu_kernels_baseline(void);
#if defined(__x86_64__)
FUSED_MASKED_MAE_CPU_HIDDEN const FmmCpuKernels* fused_masked_mae_cpu_kernels_avx2(void);
FUSED_MASKED_MAE_CPU_HIDDEN const FmmCpuKernels* fused_masked_mae_cpu_kernels_avx512(void);
#endif

}  // extern "C"

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CPU_ABI_H_
