#include "runtime/io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "runtime/core/error.h"

namespace kiln {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever (it is refused below). It does
  // not change reads of a regular file.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file; refusing to read it");
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw Error(path + ": cannot map: " + std::strerror(e));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  fd_ = fd;  // kept open so writers can copy ranges in the kernel (copy_file_range)
}

MappedFile MappedFile::in_memory(const std::string& label, size_t size, const std::function<void(uint8_t*)>& fill) {
  MappedFile m;
  m.path_ = label;
  m.fd_ = ::memfd_create("kiln-tensors", MFD_CLOEXEC);
  if (m.fd_ < 0) throw Error(label + ": cannot create an in-memory file: " + std::strerror(errno));
  if (size == 0) return m;
  if (::ftruncate(m.fd_, off_t(size)) != 0)
    throw Error(label + ": cannot size an in-memory file: " + std::strerror(errno));
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, m.fd_, 0);
  if (p == MAP_FAILED) throw Error(label + ": cannot map " + std::to_string(size) + " bytes: " + std::strerror(errno));
  m.data_ = static_cast<const uint8_t*>(p);
  m.size_ = size;
  fill(static_cast<uint8_t*>(p));
  ::mprotect(p, size, PROT_READ);
  return m;
}

MappedFile::~MappedFile() { reset(); }

MappedFile::MappedFile(MappedFile&& o) noexcept
    : path_(std::move(o.path_)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      fd_(std::exchange(o.fd_, -1)) {}

MappedFile& MappedFile::operator=(MappedFile&& o) noexcept {
  if (this != &o) {
    reset();
    path_ = std::move(o.path_);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

void MappedFile::reset() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  size_ = 0;
  fd_ = -1;
}

static void advise(const uint8_t* base, size_t size, size_t offset, size_t len, int advice) {
  if (!base || offset >= size) return;
  long page = ::sysconf(_SC_PAGESIZE);
  size_t start = offset / size_t(page) * size_t(page);
  size_t end = std::min(size, offset + len);
  ::madvise(const_cast<uint8_t*>(base) + start, end - start, advice);
}

void MappedFile::will_need(size_t offset, size_t len) const { advise(data_, size_, offset, len, MADV_WILLNEED); }
void MappedFile::dont_need(size_t offset, size_t len) const { advise(data_, size_, offset, len, MADV_DONTNEED); }

}  // namespace kiln
