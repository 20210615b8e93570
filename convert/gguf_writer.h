#pragma once
// Writes a GGUF v3 file: metadata key/values and tensor infos known up front, then each tensor's bytes streamed in
// order, every tensor at a 32-byte aligned offset. The file is written beside the destination and renamed into place
// by finish(), so an error leaves nothing half written.
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "convert/gguf_file.h"

namespace kiln::gguf {

class Writer {
 public:
  explicit Writer(std::string path, bool force);
  ~Writer();  // removes the temporary file unless finished

  void add(const std::string& key, Value value);
  void add_string(const std::string& key, const std::string& s);
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_strings(const std::string& key, const std::vector<std::string>& items);
  void add_i32s(const std::string& key, const std::vector<int32_t>& items);

  // `dims` in ggml order (dims[0] contiguous). `fill` appends exactly the tensor's bytes when the data is written.
  void add_tensor(const std::string& name, const TensorType& type, std::vector<uint64_t> dims,
                  std::function<void(std::vector<uint8_t>&)> fill);

  // Writes everything and renames the file into place.
  void finish();

 private:
  struct Pending {
    std::string name;
    const TensorType* type;
    std::vector<uint64_t> dims;
    uint64_t nbytes;
    std::function<void(std::vector<uint8_t>&)> fill;
  };
  void write(const void* p, size_t n);
  std::string path_, tmp_;
  std::FILE* out_ = nullptr;
  bool finished_ = false;
  std::vector<std::pair<std::string, Value>> metadata_;
  std::vector<Pending> tensors_;
};

}  // namespace kiln::gguf
