// XLA FFI handlers for the "Host" platform: bind the custom calls, validate,
// and call the CPU launchers (cc/cpu/masked_mae_cpu.h) on XLA's intra-op
// thread pool, as the TensorFlow CPU kernels do on theirs.
#include <functional>
#include <string>
#include <utility>

#include "cc/math/host_float16.h"
#include "cc/cpu/masked_mae_cpu.h"
#include "cc/cpu/shard_rows.h"
#include "cc/xla/masked_mae_ffi.h"

namespace fused_masked_mae::xla_ffi {
namespace {

// The launchers' ParallelFor on XLA's thread pool (rows sharded as in
// cc/cpu/shard_rows.h).
ParallelFor PoolFor(ffi::ThreadPool* pool) {
  return [pool](int64_t rows, int64_t cost_per_row, const RowRangeBody& body) {
    ShardRows(pool->num_threads(), rows, cost_per_row, body,
              [pool](std::function<void()> task) { pool->Schedule(std::move(task)); });
  };
}

// Sparse ids are host memory here: an id outside [0, C) is an error, as in
// the TensorFlow CPU kernel.
template <typename Id>
ffi::Error ValidateIds(const Id* ids, int64_t rows, int64_t num_classes) {
  const std::string invalid = InvalidClassIdMessage(ids, rows, num_classes);
  return invalid.empty() ? ffi::Error::Success() : ffi::Error::InvalidArgument(invalid);
}

template <bool kSparse>
ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                   ffi::Span<const int64_t> masked_tokens, ffi::Result<ffi::AnyBuffer> loss,
                   ffi::Result<ffi::AnyBuffer> row_keep) {
  return DispatchForward<kSparse>(y_true, y_pred, masked_tokens, loss, row_keep, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if constexpr (kSparse) {
      if (auto e = ValidateIds(call.targets, rows, num_classes); e.failure()) return e;
    }
    CpuMaskedMaeForward(call.targets, call.y_pred, rows, num_classes, call.tokens, call.loss,
                        call.row_keep, PoolFor(&pool));
    return ffi::Error::Success();
  });
}

template <bool kSparse>
ffi::Error Grad(ffi::ThreadPool pool, ffi::AnyBuffer y_true, ffi::AnyBuffer y_pred,
                ffi::AnyBuffer row_keep, ffi::AnyBuffer grad_loss,
                ffi::Result<ffi::AnyBuffer> grad_y_pred) {
  return DispatchGrad<kSparse>(y_true, y_pred, row_keep, grad_loss, grad_y_pred, [&](auto call) {
    const auto [rows, num_classes] = call.geometry;
    if constexpr (kSparse) {
      if (auto e = ValidateIds(call.targets, rows, num_classes); e.failure()) return e;
    }
    CpuMaskedMaeGradient(call.targets, call.y_pred, call.row_keep, call.grad_loss, rows,
                         num_classes, call.grad_y_pred, PoolFor(&pool));
    return ffi::Error::Success();
  });
}

}  // namespace

using HostContext = ffi::ThreadPool;
FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS("Host", Host, HostContext);

}  // namespace fused_masked_mae::xla_ffi
