#pragma once
// Streaming SHA-256 for workspace manifests, backed by OpenSSL (which uses SHA-NI where the CPU has it).
#include <atomic>
#include <cstddef>
#include <string>

namespace kiln {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t len);
  std::string hex_digest();  // finishes the hash; lowercase hex

 private:
  void* ctx_;
};

// Hashes a whole file by streaming it; throws kiln::Error naming the path. When `cancel` becomes true (another thread
// failed) or the user interrupts, it stops early by throwing kiln::Interrupted.
std::string sha256_file(const std::string& path, size_t* size_out = nullptr, const std::atomic<bool>* cancel = nullptr);

}  // namespace kiln
