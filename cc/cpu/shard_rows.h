// Row sharding for the CPU launchers' ParallelFor (masked_mae_cpu.h), shared by
// the front doors that bring their own threads: the XLA CPU handlers (XLA's
// intra-op pool) and _core (its own pool). Which thread runs a row never
// changes the row's result, so any split gives the same bits.
#ifndef FUSED_MASKED_MAE_CC_CPU_SHARD_ROWS_H_
#define FUSED_MASKED_MAE_CC_CPU_SHARD_ROWS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "cc/cpu/masked_mae_cpu.h"

namespace fused_masked_mae {

// Rows per shard are sized so that a shard is worth a task (~50k cycles).
constexpr int64_t kMinCyclesPerShard = 50000;

// Calls body over at most `threads` shards of [0, rows). Shards are claimed
// from a shared counter by the calling thread and by the tasks it hands to
// `schedule` (which runs a task on some other thread, now or later), so the
// caller finishes every shard itself if no other thread is free (no
// deadlock), and a task that starts late finds nothing left.
inline void ShardRows(int64_t threads, int64_t rows, int64_t cost_per_row,
                      const RowRangeBody& body,
                      const std::function<void(std::function<void()>)>& schedule) {
  threads = std::max<int64_t>(1, threads);
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
  for (int64_t s = 1; s < shards; ++s) schedule(run);
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->all_done.wait(lock, [&] { return shared->done.load() == shards; });
}

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_CPU_SHARD_ROWS_H_
