#pragma once
// A small fixed pool of worker threads for the CPU backend. parallel_for hands out chunks of an index range through
// an atomic counter (the calling thread works too) and returns when every chunk is done. A parallel_for issued from
// inside a worker runs serially, so ops may nest without deadlock. Workers join a job when they wake; once the caller
// has taken the last chunk, late workers skip it, so the caller never waits on a wake-up.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kiln::cpu {

class ThreadPool {
 public:
  // threads counts the caller: ThreadPool(1) starts no worker at all.
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return unsigned(workers_.size()) + 1; }
  // Calls fn(begin, end) on disjoint chunks covering [0, n), each at most `grain` long (0: n / (4 * size())).
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 0);

 private:
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  // the current job
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  bool open_ = false;  // workers may still join the current job (until the caller has run out of chunks)
  int active_ = 0;     // workers that joined the current job and are still inside it
};

}  // namespace kiln::cpu
