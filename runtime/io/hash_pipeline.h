#pragma once
// SHA-256 of a byte stream computed on a background thread, so that hashing (the slowest part of writing a workspace)
// overlaps with producing and writing the bytes. Spans are hashed in submission order; each span's memory must stay
// valid until it is hashed, which `keepalive` (owned buffers) or the caller's mmap guarantees.
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/io/sha256.h"

namespace kiln {

class HashPipeline {
 public:
  // At most max_pending_bytes of owned buffers wait for hashing; submit() blocks beyond that to bound memory.
  explicit HashPipeline(size_t max_pending_bytes = 64u << 20);
  ~HashPipeline();
  HashPipeline(const HashPipeline&) = delete;
  HashPipeline& operator=(const HashPipeline&) = delete;

  // `after` runs on the hashing thread once the span is hashed (e.g. to drop source pages from memory).
  void submit(const uint8_t* data, size_t n, std::shared_ptr<std::vector<uint8_t>> keepalive = nullptr,
              std::function<void()> after = nullptr);
  // Waits for every span and returns the hex digest.
  std::string finish();

 private:
  struct Span {
    const uint8_t* data;
    size_t n;
    std::shared_ptr<std::vector<uint8_t>> keepalive;
    std::function<void()> after;
  };
  void run();
  Sha256 hash_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Span> queue_;
  size_t pending_owned_ = 0;
  const size_t max_pending_;
  bool closing_ = false;
  std::thread worker_;
};

}  // namespace kiln
