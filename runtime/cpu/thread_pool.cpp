#include "runtime/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kiln::cpu {

namespace {
thread_local bool in_worker = false;

// How long an idle worker spins before it sleeps. Long enough to span the serial gaps between the parallel regions
// of one decode step (norms, RoPE, sampling: a few µs to tens of µs), short enough that an idle pool costs nothing
// measurable and that a pool sharing its cores with other processes soon gives them back.
constexpr auto kSpin = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}
}  // namespace

int64_t ThreadPool::default_grain(int64_t n, bool spinning, int64_t threads) {
  // A small job (a decode step's norms, RoPE, KV writes, SiLU and activation quantization over a batch's rows: a few
  // µs each, ~15 per layer) gets one contiguous share per thread. Cut finer, its chunks were claimed one at a time
  // through the shared counter, whose cache line bounced between the cores for work of ~100 ns a row, and a row's
  // consecutive ops landed on either core: SmolLM2 int4 decode, 2 threads, batch 8 +10% and batch 32 +2% (bf16 +4% and
  // +1%; batch 1 and prefill unchanged; docs/BENCHMARKS.md, session 25). Larger jobs, and any job on a pool with more
  // threads than cores (whose threads may be descheduled), keep four chunks per thread, so that a late thread's chunks
  // go to the others.
  constexpr int64_t kSmallPerThread = 16;
  const int64_t shares = spinning && n <= kSmallPerThread * threads ? threads : 4 * threads;
  return std::max<int64_t>(1, (n + shares - 1) / shares);
}

ThreadPool::ThreadPool(unsigned threads) {
  // More threads than cores: a spinning worker would hold a core that the thread it waits for needs.
  const unsigned cores = std::thread::hardware_concurrency();
  spin_ = cores == 0 || threads <= cores;
  for (unsigned i = 1; i < std::max(1u, threads); ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks() {
  for (;;) {
    int64_t begin = next_.fetch_add(grain_);
    if (begin >= n_) return;
    try {
      (*fn_)(begin, std::min(n_, begin + grain_));
    } catch (...) {
      // The first error is rethrown by parallel_for in the calling thread (a throw out of a worker would terminate
      // the process); the chunks not yet handed out are skipped.
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_);
      return;
    }
  }
}

bool ThreadPool::wait_for_job(uint64_t seen) {
  const auto until = std::chrono::steady_clock::now() + (spin_ ? kSpin : std::chrono::microseconds(0));
  for (int i = 0; generation_.load() == seen && !stop_.load(); ++i) {
    cpu_relax();
    if (i % 64 == 63 && std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(mutex_);
      // sleepers_ is raised before generation_ is checked again, and the caller bumps generation_ before it reads
      // sleepers_ (both sequentially consistent): either this check sees the new job or the caller sees a sleeper
      // and notifies under the mutex, which cannot slip in between this check and the wait.
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      sleepers_.fetch_sub(1);
    }
  }
  return !stop_.load();
}

void ThreadPool::worker_loop() {
  in_worker = true;
  uint64_t seen = 0;
  while (wait_for_job(seen)) {
    seen = generation_.load();
    // Announce first, then look: if open_ still reads true, this increment precedes the caller's closing store, so
    // the caller's wait for active_ == 0 covers this worker (and fn_ outlives its use here).
    active_.fetch_add(1);
    if (open_.load()) run_chunks();
    active_.fetch_sub(1);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain) {
  if (n <= 0) return;
  if (grain <= 0) grain = default_grain(n, spin_, int64_t(size()));
  if (workers_.empty() || in_worker || n <= grain) {
    for (int64_t b = 0; b < n; b += grain) fn(b, std::min(n, b + grain));
    return;
  }
  fn_ = &fn;
  n_ = n;
  grain_ = grain;
  next_.store(0);
  open_.store(true);
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  in_worker = true;  // the caller's own chunks must not fan out again
  run_chunks();
  in_worker = false;
  open_.store(false);
  // Only workers that joined are waited for; they are running, so a short spin suffices, yielding in case one was
  // descheduled on a busy machine.
  for (int i = 0; active_.load() != 0; ++i) {
    if (i < 1024)
      cpu_relax();
    else
      std::this_thread::yield();
  }
  fn_ = nullptr;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

}  // namespace kiln::cpu
