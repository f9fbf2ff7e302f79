// XLA FFI handlers for the "CUDA" platform: bind the custom calls, validate
// shapes and attributes, and launch the CUDA kernels (cc/kernels/masked_mae_cuda.h)
// on the stream XLA hands the call. Sparse ids live in device memory, so an id
// outside [0, C) gives NaN (as outside XLA) instead of an error.
// Compiles to nothing in builds without CUDA (GOOGLE_CUDA unset).
#if GOOGLE_CUDA
#include <string>

#include "cc/kernels/masked_mae_cuda.h"
#include "cc/xla/masked_mae_ffi.h"

namespace fused_masked_mae::xla_ffi {
namespace {

ffi::Error LaunchError(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("launching the ") + what +
                              " CUDA kernel failed: " + cudaGetErrorString(status));
}

template <bool kSparse>
ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                   ffi::Span<const int64_t> masked_tokens, ffi::Result<ffi::AnyBuffer> loss,
                   ffi::Result<ffi::AnyBuffer> row_keep) {
  const auto geometry = ValidateInputs(y_true, y_pred, kSparse);
  if (geometry.has_error()) return geometry.error();
  const auto [rows, num_classes] = geometry.value();
  const auto tokens = ValidateTokens(masked_tokens, num_classes);
  if (tokens.has_error()) return tokens.error();
  for (auto e : {ValidateLike(*loss, "loss", y_pred, true, y_pred.element_type()),
                 ValidateLike(*row_keep, "row_keep", y_pred, true, ffi::DataType::U8)}) {
    if (e.failure()) return e;
  }
  if (rows == 0) return ffi::Error::Success();
  return DispatchFloat<__half, __nv_bfloat16>(y_pred.element_type(), [&](auto zero) {
    using T = decltype(zero);
    return DispatchTargets<T, kSparse>(y_true, [&](const auto* targets) {
      const T* p = static_cast<const T*>(y_pred.untyped_data());
      T* out = static_cast<T*>(loss->untyped_data());
      uint8_t* keep = static_cast<uint8_t*>(row_keep->untyped_data());
      if constexpr (kSparse) {
        return LaunchError(LaunchSparseMaskedMaeForward(targets, p, rows, num_classes,
                                                        tokens.value(), out, keep, stream),
                           "sparse masked MAE forward");
      } else {
        return LaunchError(LaunchMaskedMaeForward(targets, p, rows, num_classes, tokens.value(),
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
  const auto geometry = ValidateInputs(y_true, y_pred, kSparse);
  if (geometry.has_error()) return geometry.error();
  const auto [rows, num_classes] = geometry.value();
  for (auto e : {ValidateLike(row_keep, "row_keep", y_pred, true, ffi::DataType::U8),
                 ValidateLike(grad_loss, "grad_loss", y_pred, true, y_pred.element_type()),
                 ValidateLike(*grad_y_pred, "grad_y_pred", y_pred, false,
                              y_pred.element_type())}) {
    if (e.failure()) return e;
  }
  if (rows == 0) return ffi::Error::Success();
  return DispatchFloat<__half, __nv_bfloat16>(y_pred.element_type(), [&](auto zero) {
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

auto BindForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("masked_tokens")
      .Ret<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}

auto BindGrad() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeForwardCuda, Forward<false>, BindForward());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeSparseForwardCuda, Forward<true>, BindForward());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeGradCuda, Grad<false>, BindGrad());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeSparseGradCuda, Grad<true>, BindGrad());

namespace {
const bool kRegistered = [] {
  RegisterHandler(kForwardTarget, "CUDA", FusedMaskedMaeForwardCuda);
  RegisterHandler(kSparseForwardTarget, "CUDA", FusedMaskedMaeSparseForwardCuda);
  RegisterHandler(kGradTarget, "CUDA", FusedMaskedMaeGradCuda);
  RegisterHandler(kSparseGradTarget, "CUDA", FusedMaskedMaeSparseGradCuda);
  return true;
}();
}  // namespace

}  // namespace fused_masked_mae::xla_ffi

#endif  // GOOGLE_CUDA
