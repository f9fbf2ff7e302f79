// XLA FFI handlers for the "Host" platform: bind the custom calls, validate,
// and call the CPU launchers (cc/cpu/masked_mae_cpu.h) on XLA's intra-op
// thread pool, as the TensorFlow CPU kernels do on theirs.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>

#include "cc/math/host_float16.h"
#include "cc/cpu/masked_mae_cpu.h"
#include "cc/xla/masked_mae_ffi.h"

namespace fused_masked_mae::xla_ffi {
namespace {

// Rows per shard are sized so that a shard is worth a task (~50k cycles).
constexpr int64_t kMinCyclesPerShard = 50000;

// The launchers' ParallelFor on XLA's thread pool. Shards are claimed from a
// shared counter by the calling thread and by the tasks it schedules, so the
// caller finishes every shard itself if no pool thread is free (no deadlock),
// and a task that starts late finds nothing left. Which thread runs a row
// never changes its result.
ParallelFor PoolFor(ffi::ThreadPool* pool) {
  return [pool](int64_t rows, int64_t cost_per_row, const RowRangeBody& body) {
    const int64_t threads = std::max<int64_t>(1, pool->num_threads());
    const int64_t min_rows =
        std::max<int64_t>(1, kMinCyclesPerShard / std::max<int64_t>(1, cost_per_row));
    const int64_t shards = std::min(threads, (rows + min_rows - 1) / min_rows);
    if (shards <= 1) {
      if (rows > 0) body(0, rows);
      return;
    }
    struct Shared {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      std::mutex mu;
      std::condition_variable all_done;
    };
    auto shared = std::make_shared<Shared>();
    const int64_t per_shard = (rows + shards - 1) / shards;
    const RowRangeBody* work = &body;  // valid until every shard is done
    auto run = [shared, shards, per_shard, rows, work] {
      for (int64_t s = shared->next.fetch_add(1); s < shards; s = shared->next.fetch_add(1)) {
        (*work)(s * per_shard, std::min(rows, (s + 1) * per_shard));
        if (shared->done.fetch_add(1) + 1 == shards) {
          std::lock_guard<std::mutex> lock(shared->mu);
          shared->all_done.notify_all();
        }
      }
    };
    for (int64_t s = 1; s < shards; ++s) {
      auto task = run;  // Schedule takes ownership of a copy
      pool->Schedule(std::move(task));
    }
    run();
    std::unique_lock<std::mutex> lock(shared->mu);
    shared->all_done.wait(lock, [&] { return shared->done.load() == shards; });
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

// For the masked cross-entropy's Host handlers (masked_ce_ffi_cpu.cc).
ParallelFor HostPoolFor(ffi::ThreadPool* pool) { return PoolFor(pool); }

using HostContext = ffi::ThreadPool;
FUSED_MASKED_MAE_DEFINE_XLA_HANDLERS("Host", Host, HostContext);

}  // namespace fused_masked_mae::xla_ffi
