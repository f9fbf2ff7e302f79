// _core's CPU threads: a process-wide pool of worker threads that the CPU
// launchers' ParallelFor runs row shards on (cc/cpu/shard_rows.h, as the XLA
// CPU handlers do on XLA's pool and the TensorFlow kernels on TensorFlow's).
// Each call says how many threads it may use (torch passes its intra-op
// count); the result does not depend on it, since a row is always reduced by
// one thread in a fixed order.
#ifndef FUSED_MASKED_MAE_CC_CORE_CORE_THREAD_POOL_H_
#define FUSED_MASKED_MAE_CC_CORE_CORE_THREAD_POOL_H_

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cc/cpu/masked_mae_cpu.h"
#include "cc/cpu/shard_rows.h"

namespace fused_masked_mae {

class CoreThreadPool {
 public:
  // The process's pool, with one worker fewer than the machine's hardware
  // threads (the caller is the last one). A child process after fork() gets
  // a fresh pool: the parent's workers do not exist there.
  static CoreThreadPool& Get() {
    static const bool at_fork_registered = [] {
      pthread_atfork(nullptr, nullptr, [] { Instance() = nullptr; });
      return true;
    }();
    (void)at_fork_registered;
    static std::mutex* mu = new std::mutex;
    std::lock_guard<std::mutex> lock(*mu);
    if (Instance() == nullptr) Instance() = new CoreThreadPool;  // never deleted (exit-safe)
    return *Instance();
  }

  // How many threads a call uses when it does not say: the hardware threads.
  static int DefaultThreads() { return std::max(1u, std::thread::hardware_concurrency()); }

  // The launchers' ParallelFor on up to `threads` threads (<= 0: DefaultThreads()).
  ParallelFor For(int threads) {
    if (threads <= 0) threads = DefaultThreads();
    if (threads == 1 || workers_ == 0) return SerialFor;
    return [this, threads](int64_t rows, int64_t cost_per_row, const RowRangeBody& body) {
      ShardRows(threads, rows, cost_per_row, body,
                [this](std::function<void()> task) { Schedule(std::move(task)); });
    };
  }

 private:
  CoreThreadPool() {
    workers_ = DefaultThreads() - 1;
    for (int i = 0; i < workers_; ++i) {
      std::thread([this] { Work(); }).detach();  // lives as long as the process
    }
  }

  static CoreThreadPool*& Instance() {
    static CoreThreadPool* instance = nullptr;
    return instance;
  }

  void Schedule(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
  }

  void Work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return !tasks_.empty(); });
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  int workers_ = 0;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
};

}  // namespace fused_masked_mae

#endif  // FUSED_MASKED_MAE_CC_CORE_CORE_THREAD_POOL_H_
