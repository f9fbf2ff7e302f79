// XLA FFI handlers of the masked cross-entropy for the "Host" platform: the
// custom calls python/fused_masked_mae/xla.py emits for MaskedCrossentropy
// under jit_compile, validated with the masked MAE's checks (masked_mae_ffi.h)
// plus the options and row_stats, running the same CPU launchers as the
// TensorFlow kernels on XLA's intra-op pool.
//   fused_masked_ce_forward(y_true, y_pred) -> (loss, row_keep u8, row_stats[..., 2] f64)
//   fused_masked_ce_grad(y_true, y_pred, row_keep, row_stats, grad_loss) -> grad_y_pred
//   fused_masked_ce_sparse_forward / fused_masked_ce_sparse_grad (s32/s64 ids)
// attributes: from_logits (i64 0/1), label_smoothing (f32), epsilon (f32);
// the forward also masked_tokens (i64 array). Targets end in
// ".import_fused_masked_mae" (see masked_mae_ffi.h).
#include <string>

#include "cc/cpu/masked_mae_cpu.h"
#include "cc/math/host_float16.h"
#include "cc/math/masked_ce_row.h"
#include "cc/xla/masked_mae_ffi.h"

namespace fused_masked_mae::xla_ffi {

ParallelFor HostPoolFor(ffi::ThreadPool* pool);  // masked_mae_ffi_cpu.cc

namespace {

constexpr const char* kCeForwardTarget = "fused_masked_ce_forward.import_fused_masked_mae";
constexpr const char* kCeGradTarget = "fused_masked_ce_grad.import_fused_masked_mae";
constexpr const char* kCeSparseForwardTarget =
    "fused_masked_ce_sparse_forward.import_fused_masked_mae";
constexpr const char* kCeSparseGradTarget = "fused_masked_ce_sparse_grad.import_fused_masked_mae";

ffi::ErrorOr<CeOptions> ValidateOptions(int64_t from_logits, float label_smoothing,
                                        float epsilon, bool sparse) {
  const CeOptions options{from_logits != 0 ? 1 : 0, label_smoothing, epsilon};
  const std::string invalid = InvalidCeOptionsMessage(options, sparse);
  if (!invalid.empty()) {
    return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(invalid));
  }
  return options;
}

// row_stats: y_pred's dims without the last, then kCeRowStats; f64.
ffi::Error ValidateRowStats(const ffi::AnyBuffer& row_stats, const ffi::AnyBuffer& y_pred) {
  const auto pred = y_pred.dimensions();
  const auto stats = row_stats.dimensions();
  bool ok = stats.size() == pred.size() && stats[stats.size() - 1] == kCeRowStats;
  for (size_t i = 0; ok && i + 1 < pred.size(); ++i) ok = stats[i] == pred[i];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "row_stats must have y_pred's shape with its last dimension replaced by " +
        std::to_string(kCeRowStats));
  }
  if (row_stats.element_type() != ffi::DataType::F64) {
    return ffi::Error::InvalidArgument("row_stats must be f64");
  }
  return ffi::Error::Success();
}

template <typename Id>
ffi::Error ValidateIds(const Id* ids, int64_t rows, int64_t num_classes) {
  const std::string invalid = InvalidClassIdMessage(ids, rows, num_classes);
  return invalid.empty() ? ffi::Error::Success() : ffi::Error::InvalidArgument(invalid);
}

template <bool kSparse>
ffi::Error CeForward(ffi::ThreadPool pool, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                     ffi::Span<const int64_t> masked_tokens, int64_t from_logits,
                     float label_smoothing, float epsilon, ffi::Result<ffi::AnyBuffer> loss,
                     ffi::Result<ffi::AnyBuffer> row_keep, ffi::Result<ffi::AnyBuffer> row_stats) {
  const auto options = ValidateOptions(from_logits, label_smoothing, epsilon, kSparse);
  if (options.has_error()) return options.error();
  if (y_pred.dimensions().size() >= 1) {
    if (auto e = ValidateRowStats(*row_stats, y_pred); e.failure()) return e;
  }
  return DispatchForward<kSparse>(y_true, y_pred, masked_tokens, loss, row_keep, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if constexpr (kSparse) {
      if (auto e = ValidateIds(call.targets, rows, num_classes); e.failure()) return e;
    }
    CpuMaskedCeForward(call.targets, call.y_pred, rows, num_classes, call.tokens,
                       options.value(), call.loss, call.row_keep,
                       static_cast<double*>(row_stats->untyped_data()), HostPoolFor(&pool));
    return ffi::Error::Success();
  });
}

template <bool kSparse>
ffi::Error CeGrad(ffi::ThreadPool pool, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                  ffi::AnyBuffer row_keep, ffi::AnyBuffer row_stats, ffi::AnyBuffer grad_loss,
                  int64_t from_logits, float label_smoothing, float epsilon,
                  ffi::Result<ffi::AnyBuffer> grad_y_pred) {
  const auto options = ValidateOptions(from_logits, label_smoothing, epsilon, kSparse);
  if (options.has_error()) return options.error();
  if (y_pred.dimensions().size() >= 1) {
    if (auto e = ValidateRowStats(row_stats, y_pred); e.failure()) return e;
  }
  return DispatchGrad<kSparse>(y_true, y_pred, row_keep, grad_loss, grad_y_pred, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if constexpr (kSparse) {
      if (auto e = ValidateIds(call.targets, rows, num_classes); e.failure()) return e;
    }
    CpuMaskedCeGradient(call.targets, call.y_pred, call.row_keep,
                        static_cast<const double*>(row_stats.untyped_data()), call.grad_loss,
                        rows, num_classes, options.value(), call.grad_y_pred, HostPoolFor(&pool));
    return ffi::Error::Success();
  });
}

auto BindCeForward() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // y_true or y_true_ids
      .Arg<ffi::AnyBuffer>()  // y_pred
      .Attr<ffi::Span<const int64_t>>("masked_tokens")
      .Attr<int64_t>("from_logits")
      .Attr<float>("label_smoothing")
      .Attr<float>("epsilon")
      .Ret<ffi::AnyBuffer>()   // loss
      .Ret<ffi::AnyBuffer>()   // row_keep
      .Ret<ffi::AnyBuffer>();  // row_stats
}

auto BindCeGrad() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // y_true or y_true_ids
      .Arg<ffi::AnyBuffer>()  // y_pred
      .Arg<ffi::AnyBuffer>()  // row_keep
      .Arg<ffi::AnyBuffer>()  // row_stats
      .Arg<ffi::AnyBuffer>()  // grad_loss
      .Attr<int64_t>("from_logits")
      .Attr<float>("label_smoothing")
      .Attr<float>("epsilon")
      .Ret<ffi::AnyBuffer>();  // grad_y_pred
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedCeForwardHost, CeForward<false>, BindCeForward());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedCeSparseForwardHost, CeForward<true>, BindCeForward());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedCeGradHost, CeGrad<false>, BindCeGrad());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FusedMaskedCeSparseGradHost, CeGrad<true>, BindCeGrad());

namespace {
const bool kCeHostRegistered = [] {
  RegisterOneHandler(kCeForwardTarget, "Host", FusedMaskedCeForwardHost);
  RegisterOneHandler(kCeSparseForwardTarget, "Host", FusedMaskedCeSparseForwardHost);
  RegisterOneHandler(kCeGradTarget, "Host", FusedMaskedCeGradHost);
  RegisterOneHandler(kCeSparseGradTarget, "Host", FusedMaskedCeSparseGradHost);
  return true;
}();
}  // namespace

}  // namespace fused_masked_mae::xla_ffi
