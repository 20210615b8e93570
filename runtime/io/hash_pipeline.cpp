#include "runtime/io/hash_pipeline.h"

namespace kiln {

HashPipeline::HashPipeline(size_t max_pending_bytes) : max_pending_(max_pending_bytes), worker_([this] { run(); }) {}

HashPipeline::~HashPipeline() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void HashPipeline::submit(const uint8_t* data, size_t n, std::shared_ptr<std::vector<uint8_t>> keepalive,
                          std::function<void()> after) {
  std::unique_lock<std::mutex> lock(mu_);
  if (keepalive) {
    cv_.wait(lock, [&] { return pending_owned_ == 0 || pending_owned_ + n <= max_pending_; });
    pending_owned_ += n;
  }
  queue_.push_back({data, n, std::move(keepalive), std::move(after)});
  cv_.notify_all();
}

void HashPipeline::run() {
  for (;;) {
    Span span;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !queue_.empty() || closing_; });
      if (queue_.empty()) return;
      span = std::move(queue_.front());
      queue_.pop_front();
    }
    hash_.update(span.data, span.n);
    if (span.after) span.after();
    std::lock_guard<std::mutex> lock(mu_);
    if (span.keepalive) pending_owned_ -= span.n;
    span.keepalive.reset();
    cv_.notify_all();
  }
}

std::string HashPipeline::finish() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  worker_.join();
  return hash_.hex_digest();
}

}  // namespace kiln
