// XLA FFI handlers for the "CUDA" platform: bind the custom calls, validate
// shapes and attributes, and launch the CUDA kernels (cc/cuda/masked_mae_cuda.h)
// on the stream XLA hands the call. Sparse ids live in device memory, so an id
// outside [0, C) gives NaN (as outside XLA) instead of an error.
// Compiles to nothing in builds without CUDA (GOOGLE_CUDA unset).
#if GOOGLE_CUDA
#include <string>

#include "cc/cuda/cuda_driver.h"
#include "cc/math/host_float16.h"
#include "cc/cuda/masked_mae_cuda.h"
#include "cc/xla/masked_mae_ffi.h"

namespace fused_masked_mae::xla_ffi {
namespace {

ffi::Error LaunchError(CUresult status, const char* what) {
  if (status == CUDA_SUCCESS) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("launching the ") + what +
                              " CUDA kernel failed: " + cuda::ErrorMessage(status));
}

template <bool kSparse>
ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                   ffi::Span<const int64_t> masked_tokens, ffi::Result<ffi::AnyBuffer> loss,
                   ffi::Result<ffi::AnyBuffer> row_keep) {
  return DispatchForward<kSparse>(y_true, y_pred, masked_tokens, loss, row_keep, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if (rows == 0) return ffi::Error::Success();
    if constexpr (kSparse) {
      return LaunchError(LaunchSparseMaskedMaeForward(call.targets, call.y_pred, rows, num_classes,
                                                      call.tokens, call.loss, call.row_keep,
                                                      stream),
                         "sparse masked MAE forward");
    } else {
      return LaunchError(LaunchMaskedMaeForward(call.targets, call.y_pred, rows, num_classes,
                                                call.tokens, call.loss, call.row_keep, stream),
                         "masked MAE forward");
    }
  });
}

template <bool kSparse>
ffi::Error Grad(cudaStream_t stream, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                ffi::AnyBuffer row_keep, ffi::AnyBuffer grad_loss,
                ffi::Result<ffi::AnyBuffer> grad_y_pred) {
  return DispatchGrad<kSparse>(y_true, y_pred, row_keep, grad_loss, grad_y_pred, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if (rows == 0) return ffi::Error::Success();
    if constexpr (kSparse) {
      return LaunchError(LaunchSparseMaskedMaeGradient(call.targets, call.y_pred, call.row_keep,
                                                       call.grad_loss, rows, num_classes,
                                                       call.grad_y_pred, stream),
                         "sparse masked MAE gradient");
    } else {
      return LaunchError(LaunchMaskedMaeGradient(call.targets, call.y_pred, call.row_keep,
                                                 call.grad_loss, rows, num_classes,
                                                 call.grad_y_pred, stream),
                         "masked MAE gradient");
    }
  });
}

// Like the TF GPU kernels (masked_mae_kernels.cc): no handlers for the GPU when
// the driver is there but unusable (below r525), so that GPUs stay on the
// composite under XLA; the op library has already logged why. No driver at
// all: registered (XLA then has no GPU to run them on).
bool DriverAllowsCudaHandlers() {
  const cuda::DriverStatus& driver = cuda::Driver();
  return driver.state == cuda::DriverState::kOk || driver.version <= 0;
}

}  // namespace

using CudaContext = ffi::PlatformStream<cudaStream_t>;
FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS_IF("CUDA", Cuda, CudaContext, DriverAllowsCudaHandlers());

}  // namespace fused_masked_mae::xla_ffi

#endif  // GOOGLE_CUDA
