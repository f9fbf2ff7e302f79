// TensorFlow-free entry points to the CUDA kernels, shared by the TensorFlow GPU
// kernels (masked_mae_kernels.cc) and the pybind11 core (cc/core/). Inputs are
// row-major [rows, num_classes] device arrays; callers validate shapes, token
// ids (< num_classes) and rows * num_classes (fits int64) before launching.
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cc/kernels/masked_mae_row.h"

namespace fused_masked_mae {

// T is float, double, __half or __nv_bfloat16. Launches nothing for rows == 0.
// The forward writes each row's keep byte to row_keep (may be null); the
// gradient reads it back instead of re-deriving the argmaxes.
// Returns the launch status (asynchronous execution errors surface later on
// the stream, as for any CUDA kernel).
template <typename T>
cudaError_t LaunchMaskedMaeForward(const T* y_true, const T* y_pred, int64_t rows,
                                   int64_t num_classes, const MaskedTokenSet& tokens, T* loss,
                                   uint8_t* row_keep, cudaStream_t stream);

template <typename T>
cudaError_t LaunchMaskedMaeGradient(const T* y_true, const T* y_pred, const uint8_t* row_keep,
                                    const T* grad_loss, int64_t rows, int64_t num_classes,
                                    T* grad_y_pred, cudaStream_t stream);

// The sparse loss: y_true_ids [rows] (int32 or int64) stands for one_hot(ids).
// An id outside [0, num_classes) gives a NaN loss and a NaN gradient row.
template <typename T, typename Id>
cudaError_t LaunchSparseMaskedMaeForward(const Id* y_true_ids, const T* y_pred, int64_t rows,
                                         int64_t num_classes, const MaskedTokenSet& tokens,
                                         T* loss, uint8_t* row_keep, cudaStream_t stream);

template <typename T, typename Id>
cudaError_t LaunchSparseMaskedMaeGradient(const Id* y_true_ids, const T* y_pred,
                                          const uint8_t* row_keep, const T* grad_loss,
                                          int64_t rows, int64_t num_classes, T* grad_y_pred,
                                          cudaStream_t stream);

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_CUDA_H_
