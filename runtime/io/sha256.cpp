#include "runtime/io/sha256.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/path_safety.h"

namespace kiln {

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (!ctx_ || EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(ctx_), EVP_sha256(), nullptr) != 1)
    throw Error("sha256: OpenSSL initialisation failed");
}

Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_)); }

void Sha256::update(const void* data, size_t len) { EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(ctx_), data, len); }

std::string Sha256::hex_digest() {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx_), md, &n);
  static const char* hex = "0123456789abcdef";
  std::string out(size_t(n) * 2, '0');
  for (unsigned i = 0; i < n; ++i) {
    out[2 * i] = hex[md[i] >> 4];
    out[2 * i + 1] = hex[md[i] & 15];
  }
  return out;
}

std::string sha256_file(const std::string& path, size_t* size_out, const std::atomic<bool>* cancel) {
  require_regular_file(path);  // a FIFO would block the open, a device never end
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  Sha256 h;
  std::vector<char> buf(1 << 20);
  size_t total = 0;
  for (;;) {
    if ((cancel && cancel->load()) || interrupt_requested()) {
      ::close(fd);
      throw Interrupted();
    }
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      throw Error(path + ": read failed: " + std::strerror(e));
    }
    if (n == 0) break;
    h.update(buf.data(), size_t(n));
    total += size_t(n);
  }
  ::close(fd);
  if (size_out) *size_out = total;
  return h.hex_digest();
}

}  // namespace kiln
