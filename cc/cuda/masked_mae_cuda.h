// TensorFlow-free entry points to the CUDA kernels, shared by the TensorFlow GPU
// kernels (masked_mae_kernels.cc) and the pybind11 core (cc/core/). Inputs are
// row-major [rows, num_classes] device arrays; callers validate shapes, token
// ids (< num_classes) and rows * num_classes (fits int64) before launching.
//
// Host code only (masked_mae_launch.cc, plain C++): the launchers pick a
// kernel and its launch shape and launch it through the CUDA driver API
// (cuda_driver.h), with no CUDA runtime. The 16-bit element types are the host
// ones (host_float16.h), bit-compatible with __half/__nv_bfloat16 and
// Eigen::half/bfloat16: callers view their pointers as those.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_

#include <cuda.h>  // CUDA 12 driver API header (types only; libcuda is dlopen'ed)

#include <cstdint>

#include "cc/math/masked_ce_row.h"
#include "cc/math/masked_mae_row.h"

// The CUDA runtime's stream type is the driver's CUstream (the same handle);
// declared here the way driver_types.h declares it, so that code using the
// runtime headers (TensorFlow's) and code without them agree.
typedef struct CUstream_st* cudaStream_t;

namespace fused_masked_mae {

// T is float, double, HostHalf or HostBFloat16. Launches nothing for rows == 0.
// The forward writes each row's keep byte to row_keep (may be null); the
// gradient reads it back instead of re-deriving the argmaxes, one streaming
// pass over its inputs.
// Returns the launch status (asynchronous execution errors surface later on
// the stream, as for any CUDA kernel); cuda::ErrorMessage (cuda_driver.h) says
// what went wrong, e.g. a driver older than the minimum or no image for the GPU.
template <typename T>
CUresult LaunchMaskedMaeForward(const T* y_true, const T* y_pred, int64_t rows,
                                int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                uint8_t* row_keep, cudaStream_t stream);

template <typename T>
CUresult LaunchMaskedMaeGradient(const T* y_true, const T* y_pred, const uint8_t* row_keep,
                                 const T* grad_loss, int64_t rows, int64_t num_classes,
                                 T* grad_y_pred, cudaStream_t stream);

// The sparse loss: y_true_ids [rows] (int32 or int64) stands for one_hot(ids).
// An id outside [0, num_classes) gives a NaN loss and a NaN gradient row.
template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeForward(const Id* y_true_ids, const T* y_pred, int64_t rows,
                                      int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                      uint8_t* row_keep, cudaStream_t stream);

template <typename T, typename Id>
CUresult LaunchSparseMaskedMaeGradient(const Id* y_true_ids, const T* y_pred,
                                       const uint8_t* row_keep, const T* grad_loss, int64_t rows,
                                       int64_t num_classes, T* grad_y_pred, cudaStream_t stream);

// The masked cross-entropy (masked_ce_row.h): TargetT is T (dense) or
// int32_t/int64_t ids (an id outside [0, C) gives a NaN loss and gradient
// row). The forward writes the keep byte and kCeRowStats float64 per row
// (either may be null); the gradient streams the rows once from them.
template <typename T, typename TargetT>
CUresult LaunchMaskedCeForward(const TargetT* y_true, const T* y_pred, int64_t rows,
                               int64_t num_classes, const MaskedTokenSet& tokens,
                               const CeOptions& options, T* loss, uint8_t* row_keep,
                               double* row_stats, cudaStream_t stream);

template <typename T, typename TargetT>
CUresult LaunchMaskedCeGradient(const TargetT* y_true, const T* y_pred, const uint8_t* row_keep,
                                const double* row_stats, const T* grad_loss, int64_t rows,
                                int64_t num_classes, const CeOptions& options, T* grad_y_pred,
                                cudaStream_t stream);

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_
