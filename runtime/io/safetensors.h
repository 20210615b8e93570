#pragma once
// safetensors: an 8-byte little-endian header length, a JSON header, then the raw tensor bytes. The reader validates
// everything before a single tensor byte is trusted (see parse_safetensors_header); the writer streams tensors in a
// fixed order so that output is byte-deterministic.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/io/hash_pipeline.h"
#include "runtime/io/mapped_file.h"

namespace kiln {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

// "[2, 3]", for error messages.
std::string shape_string(const std::vector<int64_t>& shape);

struct SafetensorsHeader {
  uint64_t data_start = 0;          // absolute offset of the data section in the file
  std::vector<TensorInfo> tensors;  // in header order
  std::map<std::string, std::string> metadata;
};

// Largest header we accept. The biggest real checkpoints have headers of a few MB.
constexpr uint64_t kMaxSafetensorsHeader = 100ull << 20;

// Validates a complete safetensors file image: header length inside the file and under the cap, well-formed JSON, known
// dtypes, shape x dtype size = byte range, offsets inside the data section, contiguous and non-overlapping, and
// covering the data section exactly (as the reference implementation requires). `label` names the file in errors.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, const std::string& label);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  // Tensors that another reader found laid out in a mapped file (a torch.save zip), with data_start 0 and offsets
  // that reader has checked against the file. Such a layout may share bytes between tensors (tied weights).
  SafetensorsFile(MappedFile file, SafetensorsHeader header);
  const std::string& path() const { return file_.path(); }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& t) const { return file_.data() + header_.data_start + t.begin; }
  const MappedFile& file() const { return file_; }
  uint64_t data_start() const { return header_.data_start; }

 private:
  MappedFile file_;
  SafetensorsHeader header_;
  std::map<std::string, size_t> index_;
};

struct TensorPlan {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

// Writes one safetensors file whose header is known up front; tensor bytes are then appended in plan order.
// The file's sha256 is computed on a background thread while writing, so no second read is needed for the manifest.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, std::vector<TensorPlan> plan,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  // Appends bytes of the current tensor(s). The total must match the plan exactly by finish().
  void write(const void* bytes, size_t n);
  // Appends n bytes of `src` starting at file offset `offset`, copied inside the kernel (copy_file_range) when the
  // filesystem allows. `after` runs once those bytes are hashed (the source map must stay valid until then).
  void copy_range(const MappedFile& src, uint64_t offset, size_t n, std::function<void()> after = nullptr);
  struct Result {
    std::string sha256;
    uint64_t size;
  };
  Result finish();

 private:
  void submit_buffer();
  void write_all(const uint8_t* p, size_t n);
  void count(size_t n);
  std::string path_;
  int fd_ = -1;
  uint64_t expected_ = 0;  // tensor bytes planned
  uint64_t written_ = 0;   // tensor bytes written so far
  uint64_t file_bytes_ = 0;
  bool header_done_ = false;
  std::vector<std::shared_ptr<std::vector<uint8_t>>> pool_;  // write buffers, reused once hashed
  std::shared_ptr<std::vector<uint8_t>> buf_;
  size_t buf_used_ = 0;
  HashPipeline hash_;
};

}  // namespace kiln
