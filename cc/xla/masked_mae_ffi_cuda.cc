// XLA FFI handlers for the "CUDA" platform: bind the custom calls, validate
// shapes and attributes, and launch the CUDA kernels (cc/kernels/masked_mae_cuda.h)
// on the stream XLA hands the call. Sparse ids live in device memory, so an id
// outside [0, C) gives NaN (as outside XLA) instead of an error.
// Compiles to nothing in builds without CUDA (GOOGLE_CUDA unset).
#if GOOGLE_CUDA
#include <string>

#include "cc/kernels/cuda_driver.h"
#include "cc/kernels/host_float16.h"
#include "cc/kernels/masked_mae_cuda.h"
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
  const auto call = ValidateForward(y_true, y_pred, masked_tokens, *loss, *row_keep, kSparse);
  if (call.has_error()) return call.error();
  const auto [rows, num_classes] = call.value().geometry;
  const MaskedTokenSet& tokens = call.value().tokens;
  if (rows == 0) return ffi::Error::Success();
  return DispatchFloat<HostHalf, HostBFloat16>(y_pred.element_type(), [&](auto zero) {
    using T = decltype(zero);
    return DispatchTargets<T, kSparse>(y_true, [&](const auto* targets) {
      const T* p = static_cast<const T*>(y_pred.untyped_data());
      T* out = static_cast<T*>(loss->untyped_data());
      uint8_t* keep = static_cast<uint8_t*>(row_keep->untyped_data());
      if constexpr (kSparse) {
        return LaunchError(LaunchSparseMaskedMaeForward(targets, p, rows, num_classes,
                                                        tokens, out, keep, stream),
                           "sparse masked MAE forward");
      } else {
        return LaunchError(LaunchMaskedMaeForward(targets, p, rows, num_classes, tokens,
                                                  out, keep, stream),
                           "masked MAE forward");
      }
    });
  });
}

template <bool kSparse>
ffi::Error Grad(cudaStream_t stream, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                ffi::AnyBuffer row_keep, ffi::AnyBuffer grad_loss,
                ffi::Result<ffi::AnyBuffer> grad_y_pred) {
  const auto geometry =
      ValidateGrad(y_true, y_pred, row_keep, grad_loss, *grad_y_pred, kSparse);
  if (geometry.has_error()) return geometry.error();
  const auto [rows, num_classes] = geometry.value();
  if (rows == 0) return ffi::Error::Success();
  return DispatchFloat<HostHalf, HostBFloat16>(y_pred.element_type(), [&](auto zero) {
    using T = decltype(zero);
    return DispatchTargets<T, kSparse>(y_true, [&](const auto* targets) {
      const T* p = static_cast<const T*>(y_pred.untyped_data());
      const uint8_t* keep = static_cast<const uint8_t*>(row_keep.untyped_data());
      const T* g = static_cast<const T*>(grad_loss.untyped_data());
      T* out = static_cast<T*>(grad_y_pred->untyped_data());
      if constexpr (kSparse) {
        return LaunchError(LaunchSparseMaskedMaeGradient(targets, p, keep, g, rows, num_classes,
                                                         out, stream),
                           "sparse masked MAE gradient");
      } else {
        return LaunchError(
            LaunchMaskedMaeGradient(targets, p, keep, g, rows, num_classes, out, stream),
            "masked MAE gradient");
      }
    });
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
