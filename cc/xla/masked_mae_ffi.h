// XLA FFI front door: what the CPU (masked_mae_ffi_cpu.cc) and CUDA
// (masked_mae_ffi_cuda.cc) handlers share. They bind the custom calls that
// python/fused_masked_mae/xla.py emits, validate every buffer and attribute
// here, and call the same launchers as the TensorFlow kernels. No math here.
//
// Custom-call targets (each registered for "Host" and, in CUDA builds, "CUDA",
// with the suffix ".import_fused_masked_mae", see below):
//   fused_masked_mae_forward(y_true[..., C], y_pred[..., C]) -> (loss[...], row_keep[...] u8)
//   fused_masked_mae_grad(y_true, y_pred, row_keep, grad_loss) -> grad_y_pred[..., C]
//   fused_masked_mae_sparse_forward / fused_masked_mae_sparse_grad: y_true_ids[...] s32/s64
// attribute (forward only): masked_tokens, an i64 array.
#ifndef FUSED_MASKED_MAE_CC_XLA_MASKED_MAE_FFI_H_
#define FUSED_MASKED_MAE_CC_XLA_MASKED_MAE_FFI_H_

#include <cstdint>
#include <string>
#include <type_traits>

#include "cc/math/host_float16.h"
#include "cc/math/masked_mae_row.h"
#include "xla/ffi/api/ffi.h"

// This library links no framework. TensorFlow's XLA FFI API (its C++
// accessor xla::ffi::GetXlaFfiApi(), exported by libtensorflow_framework.so.2)
// is looked up in the process when the Python package registers the handlers
// with TensorFlow (RegisterWithTensorFlow); JAX takes the handler pointers
// instead. Every handler reaches its XLA through the call frame's own API, so
// one binary serves both.

namespace fused_masked_mae::xla_ffi {

namespace ffi = ::xla::ffi;

// The suffix is for a SavedModel loaded without the package: XLA's only
// message is "No FFI handler registered for <target>", so the target says
// what to import (as the op namespace Import_fused_masked_mae does).
constexpr const char* kForwardTarget = "fused_masked_mae_forward.import_fused_masked_mae";
constexpr const char* kGradTarget = "fused_masked_mae_grad.import_fused_masked_mae";
constexpr const char* kSparseForwardTarget =
    "fused_masked_mae_sparse_forward.import_fused_masked_mae";
constexpr const char* kSparseGradTarget = "fused_masked_mae_sparse_grad.import_fused_masked_mae";

// [rows, num_classes] view of validated inputs.
struct RowGeometry {
  int64_t rows;
  int64_t num_classes;
};

// Checks y_true (dense: y_pred's dims and dtype; sparse: y_pred's dims without
// the last, s32/s64) and y_pred (float, rank >= 1, C > 0).
ffi::ErrorOr<RowGeometry> ValidateInputs(const ffi::AnyBuffer& y_true,
                                         const ffi::AnyBuffer& y_pred, bool sparse);

// The forward's masked ids: at most kMaxMaskedTokens, each in [0, C).
ffi::ErrorOr<MaskedTokenSet> ValidateTokens(ffi::Span<const int64_t> ids, int64_t num_classes);

// A buffer that must have y_pred's dims without the last (per_row) or all of
// them, and the given dtype.
ffi::Error ValidateLike(const ffi::AnyBuffer& buffer, const char* name,
                        const ffi::AnyBuffer& y_pred, bool per_row, ffi::DataType dtype);

// Everything a forward handler checks: inputs, tokens, and the loss/row_keep
// outputs; returns the row view and the token set.
struct ForwardCall {
  RowGeometry geometry;
  MaskedTokenSet tokens;
};
ffi::ErrorOr<ForwardCall> ValidateForward(const ffi::AnyBuffer& y_true,
                                          const ffi::AnyBuffer& y_pred,
                                          ffi::Span<const int64_t> masked_tokens,
                                          const ffi::AnyBuffer& loss,
                                          const ffi::AnyBuffer& row_keep, bool sparse);

// Everything a gradient handler checks: inputs, row_keep, grad_loss, output.
ffi::ErrorOr<RowGeometry> ValidateGrad(const ffi::AnyBuffer& y_true, const ffi::AnyBuffer& y_pred,
                                       const ffi::AnyBuffer& row_keep,
                                       const ffi::AnyBuffer& grad_loss,
                                       const ffi::AnyBuffer& grad_y_pred, bool sparse);

// The handlers' signatures; Context is the platform's (thread pool, stream).
template <typename Context>
auto BindForward() {
  return ffi::Ffi::Bind()
      .Ctx<Context>()
      .template Arg<ffi::AnyBuffer>()  // y_true or y_true_ids
      .template Arg<ffi::AnyBuffer>()  // y_pred
      .template Attr<ffi::Span<const int64_t>>("masked_tokens")
      .template Ret<ffi::AnyBuffer>()   // loss
      .template Ret<ffi::AnyBuffer>();  // row_keep
}

template <typename Context>
auto BindGrad() {
  return ffi::Ffi::Bind()
      .Ctx<Context>()
      .template Arg<ffi::AnyBuffer>()   // y_true or y_true_ids
      .template Arg<ffi::AnyBuffer>()   // y_pred
      .template Arg<ffi::AnyBuffer>()   // row_keep
      .template Arg<ffi::AnyBuffer>()   // grad_loss
      .template Ret<ffi::AnyBuffer>();  // grad_y_pred
}

// Calls fn(T{}) for y_pred's float dtype, with Half/BFloat16 standing for the
// 16-bit types (host or CUDA types of the same bit layout).
template <typename Half, typename BFloat16, typename Fn>
ffi::Error DispatchFloat(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::F16:
      return fn(Half{});
    case ffi::DataType::BF16:
      return fn(BFloat16{});
    case ffi::DataType::F32:
      return fn(float{});
    case ffi::DataType::F64:
      return fn(double{});
    default:
      return ffi::Error::InvalidArgument("y_pred must be f16, bf16, f32 or f64");
  }
}

// Calls fn(targets) with y_true's data: T values (dense) or int32/int64 ids.
template <typename T, bool kSparse, typename Fn>
ffi::Error DispatchTargets(const ffi::AnyBuffer& y_true, Fn&& fn) {
  if constexpr (!kSparse) {
    return fn(static_cast<const T*>(y_true.untyped_data()));
  } else {
    if (y_true.element_type() == ffi::DataType::S32) {
      return fn(static_cast<const int32_t*>(y_true.untyped_data()));
    }
    return fn(static_cast<const int64_t*>(y_true.untyped_data()));
  }
}

// A validated forward call, with y_pred's dtype resolved: T is its element
// type (HostHalf/HostBFloat16 for the 16-bit ones, which have the CUDA types'
// bit layout) and Targets is T (dense) or the ids' int32/int64.
template <typename T, typename Targets>
struct TypedForward {
  const Targets* targets;
  const T* y_pred;
  RowGeometry geometry;
  const MaskedTokenSet& tokens;
  T* loss;
  uint8_t* row_keep;
};

// Validates a forward call, then returns launch(TypedForward<T, Targets>).
template <bool kSparse, typename Launch>
ffi::Error DispatchForward(ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                           ffi::Span<const int64_t> masked_tokens,
                           ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> row_keep,
                           Launch&& launch) {
  const auto call = ValidateForward(y_true, y_pred, masked_tokens, *loss, *row_keep, kSparse);
  if (call.has_error()) return call.error();
  return DispatchFloat<HostHalf, HostBFloat16>(y_pred.element_type(), [&](auto zero) {
    using T = decltype(zero);
    return DispatchTargets<T, kSparse>(y_true, [&](const auto* targets) -> ffi::Error {
      using Targets = std::remove_cv_t<std::remove_pointer_t<decltype(targets)>>;
      return launch(TypedForward<T, Targets>{
          targets, static_cast<const T*>(y_pred.untyped_data()), call.value().geometry,
          call.value().tokens, static_cast<T*>(loss->untyped_data()),
          static_cast<uint8_t*>(row_keep->untyped_data())});
    });
  });
}

// A validated gradient call, with y_pred's dtype resolved (as TypedForward).
template <typename T, typename Targets>
struct TypedGrad {
  const Targets* targets;
  const T* y_pred;
  const uint8_t* row_keep;
  const T* grad_loss;
  RowGeometry geometry;
  T* grad_y_pred;
};

// Validates a gradient call, then returns launch(TypedGrad<T, Targets>).
template <bool kSparse, typename Launch>
ffi::Error DispatchGrad(ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred, ffi::AnyBuffer row_keep,
                        ffi::AnyBuffer grad_loss, ffi::Result<ffi::AnyBuffer> grad_y_pred,
                        Launch&& launch) {
  const auto geometry = ValidateGrad(y_true, y_pred, row_keep, grad_loss, *grad_y_pred, kSparse);
  if (geometry.has_error()) return geometry.error();
  return DispatchFloat<HostHalf, HostBFloat16>(y_pred.element_type(), [&](auto zero) {
    using T = decltype(zero);
    return DispatchTargets<T, kSparse>(y_true, [&](const auto* targets) -> ffi::Error {
      using Targets = std::remove_cv_t<std::remove_pointer_t<decltype(targets)>>;
      return launch(TypedGrad<T, Targets>{
          targets, static_cast<const T*>(y_pred.untyped_data()),
          static_cast<const uint8_t*>(row_keep.untyped_data()),
          static_cast<const T*>(grad_loss.untyped_data()), geometry.value(),
          static_cast<T*>(grad_y_pred->untyped_data())});
    });
  });
}

// Records the four handlers of `platform` in the library's handler table
// (called from static initializers; `allowed` false: the platform's handlers
// exist but must not run here, e.g. an NVIDIA driver below the floor).
// Nothing is registered with any XLA yet: TensorFlow's registration is
// RegisterWithTensorFlow() (called by the Python package after importing
// TensorFlow), JAX's is jax.ffi.register_ffi_target with the handler
// pointers from FusedMaskedMaeXlaHandler() (python/fused_masked_mae/jax.py).
void AddHandlers(const char* platform, bool allowed, XLA_FFI_Handler* forward,
                 XLA_FFI_Handler* sparse_forward, XLA_FFI_Handler* grad,
                 XLA_FFI_Handler* sparse_grad);

// Registers every allowed handler with TensorFlow's XLA (once per process)
// and returns the report: one line per registration, "<platform> <target> ok"
// or "<platform> <target> error: <message>".
std::string RegisterWithTensorFlow();

// The allowed handler of `target` for `platform`, or null.
XLA_FFI_Handler* FindHandler(const std::string& platform, const std::string& target);

// The table: "<platform> <target> allowed|refused" per line.
std::string Targets();

}  // namespace fused_masked_mae::xla_ffi

// Defines the four handler symbols of a platform from the Forward<kSparse> and
// Grad<kSparse> functions in scope, bound with CONTEXT (the platform's thread
// pool or stream), and records them for PLATFORM in the handler table when the
// library loads (the _IF form: allowed only when CONDITION, evaluated then, holds).
#define FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS(PLATFORM, SUFFIX, CONTEXT) \
  FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS_IF(PLATFORM, SUFFIX, CONTEXT, true)
#define FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS_IF(PLATFORM, SUFFIX, CONTEXT, CONDITION)      \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeForward##SUFFIX, Forward<false>,             \
                                BindForward<CONTEXT>());                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeSparseForward##SUFFIX, Forward<true>,        \
                                BindForward<CONTEXT>());                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeGrad##SUFFIX, Grad<false>, BindGrad<CONTEXT>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedMaeSparseGrad##SUFFIX, Grad<true>,              \
                                BindGrad<CONTEXT>());                                      \
  static const bool kRecorded##SUFFIX = [] {                                               \
    AddHandlers(PLATFORM, (CONDITION), FusedMaskedMaeForward##SUFFIX,                      \
                FusedMaskedMaeSparseForward##SUFFIX, FusedMaskedMaeGrad##SUFFIX,           \
                FusedMaskedMaeSparseGrad##SUFFIX);                                         \
    return true;                                                                           \
  }()

#endif  // FUSED_MASKED_MAE_CC_XLA_MASKED_MAE_FFI_H_
