#pragma once
// A read-only memory map of a whole file. Weights are read through maps so that a model bigger than RAM streams from
// the page cache instead of being copied into the heap.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace kiln {

class MappedFile {
 public:
  MappedFile() = default;
  explicit MappedFile(const std::string& path);  // throws kiln::Error naming the path
  // `size` bytes of anonymous memory (a memfd, so writers can still copy_file_range from it) that `fill` writes once
  // before they become read-only; `label` stands for the path in messages. For tensors rebuilt in memory from a source
  // whose layout cannot be mapped as is (strided views in a torch.save checkpoint).
  static MappedFile in_memory(const std::string& label, size_t size, const std::function<void(uint8_t*)>& fill);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }
  // Tells the kernel a byte range will be read soon / is no longer needed, to keep streaming memory bounded.
  void will_need(size_t offset, size_t len) const;
  void dont_need(size_t offset, size_t len) const;

 private:
  void reset();
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  int fd_ = -1;
};

}  // namespace kiln
