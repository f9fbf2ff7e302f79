// Device functors for the fused masked MAE ops (the tensorflow/addons pattern):
// the OpKernels in masked_mae_kernels.cc validate inputs and allocate outputs,
// then call these on CPU or GPU. Inputs are viewed as [rows, num_classes].
//
// The forward also writes one keep byte per row (row_keep), which the gradient
// reads instead of re-deriving the argmaxes.
//
// TargetT is T for the dense loss (y_true [rows, num_classes]) and int32/int64
// for the sparse loss (y_true_ids [rows], standing for one_hot(ids)).
#ifndef FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNELS_H_
#define FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNELS_H_

#include "cc/math/masked_mae_row.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace fused_masked_mae {

template <typename Device, typename T, typename TargetT>
struct MaskedMaeFunctor {
  absl::Status operator()(tensorflow::OpKernelContext* ctx, const TargetT* y_true,
                          const T* y_pred, int64_t rows, int64_t num_classes,
                          const MaskedTokenSet& tokens, T* loss, uint8_t* row_keep);
};

template <typename Device, typename T, typename TargetT>
struct MaskedMaeGradFunctor {
  absl::Status operator()(tensorflow::OpKernelContext* ctx, const TargetT* y_true,
                          const T* y_pred, const uint8_t* row_keep, const T* grad_loss,
                          int64_t rows, int64_t num_classes, T* grad_y_pred);
};

// Input validation shared with the masked cross-entropy kernels
// (masked_ce_kernels.cc); defined and instantiated in masked_mae_kernels.cc.
// Checks y_true/y_pred and the tokens, sets the [rows, num_classes] view and
// the loss shape; returns false with ctx's status set on invalid input.
template <typename Device, typename T, typename TargetT>
bool ValidateInputs(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& y_true,
                    const tensorflow::Tensor& y_pred, const MaskedTokenSet& tokens,
                    int64_t* rows, int64_t* num_classes, tensorflow::TensorShape* loss_shape);

// A per-row input of a gradient op must have the loss's shape.
bool ValidateRowInput(tensorflow::OpKernelContext* ctx, const tensorflow::Tensor& tensor,
                      const char* name, const tensorflow::TensorShape& loss_shape);

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_KERNELS_MASKED_MAE_KERNELS_H_
