#pragma once
// A small fixed pool of worker threads for the CPU backend. parallel_for hands out chunks of an index range through
// an atomic counter (the calling thread works too) and returns when every chunk is done. A parallel_for issued from
// inside a worker runs serially, so ops may nest without deadlock.
//
// Batch-1 decode issues hundreds of parallel_for calls of tens of µs each per token. A worker asleep on a condition
// variable needs a futex wake-up (tens of µs, a whole time slice when the cores are busy) before it can help, so the
// caller often ended up doing the whole job alone. Workers therefore spin on the job counter for a short while after
// each job (kSpin) before they sleep, and the caller only issues a wake-up when some worker is asleep. A worker that
// arrives after the caller has taken the last chunk skips the job, so the caller never waits on a wake-up either.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
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
  // Calls fn(begin, end) on disjoint chunks covering [0, n), each at most `grain` long (0: default_grain). If fn
  // throws, the remaining chunks are skipped and the first exception is rethrown here once the workers are done.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 0);
  // The chunk length parallel_for uses for grain 0: one share per thread for a small job (n <= 16 per thread) on a
  // pool whose workers spin, else a quarter of a share.
  static int64_t default_grain(int64_t n, bool spinning, int64_t threads);

 private:
  void worker_loop();
  void run_chunks();
  // Waits until generation_ differs from `seen` (spinning first, then asleep); false when the pool is stopping.
  bool wait_for_job(uint64_t seen);

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};  // bumped once per parallel_for that uses the workers
  std::atomic<bool> stop_{false};
  bool spin_ = true;  // false when the pool has more threads than the machine has cores
  // Sleeping workers: the caller takes the mutex and notifies only while this is non-zero.
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  // The current job. Its fields are written before open_ is set (release) and read after it is seen (acquire).
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> open_{false};  // workers may still join the current job (until the caller has run out of chunks)
  std::atomic<int> active_{0};     // workers inside the current job (or deciding whether to join it)
  std::mutex error_mutex_;
  std::exception_ptr error_;  // the current job's first exception
};

}  // namespace kiln::cpu
