#pragma once
// GGUF, llama.cpp's single-file model format (versions 2 and 3, little-endian): a header, typed metadata key/values,
// tensor infos, then the tensor data at an aligned offset. The parser validates every length, count, type and offset
// against the file before anything is trusted, like the safetensors reader; bad input is one kiln::Error naming the
// file and the field. A model may be split over several files (NAME-00001-of-00003.gguf); GgufModel opens them all.
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/io/mapped_file.h"

namespace kiln::gguf {

// Metadata value types, numbered as in the file.
enum class ValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};
const char* value_type_name(ValueType t);

struct Value {
  ValueType type = ValueType::U8;
  uint64_t u = 0;                          // unsigned integers and bool
  int64_t i = 0;                           // signed integers
  double f = 0;                            // F32, F64
  std::string s;                           // STRING
  ValueType element_type = ValueType::U8;  // ARRAY
  std::vector<Value> items;                // ARRAY

  bool is_integer() const;
  bool is_float() const { return type == ValueType::F32 || type == ValueType::F64; }
  // The value as int64 (any integer type; unsigned ones must fit), or nullopt.
  std::optional<int64_t> as_int() const;
  // The value as double (any number type), or nullopt.
  std::optional<double> as_number() const;
  // "[49152 strings]" for arrays, the value itself for scalars; strings are cut after `max_chars`.
  std::string summary(size_t max_chars = 80) const;
};

// ggml tensor types, numbered as in the file, and their block geometry.
struct TensorType {
  uint32_t id;
  const char* name;
  uint32_t block_size;  // elements per block
  uint32_t type_size;   // bytes per block
};
// nullptr for an id that no ggml version assigns (or that was removed, e.g. Q4_2).
const TensorType* find_tensor_type(uint32_t id);

struct TensorInfo {
  std::string name;
  const TensorType* type = nullptr;
  std::vector<uint64_t> dims;  // ggml order: dims[0] is the contiguous one (a linear weight is [in, out])
  uint64_t offset = 0;         // relative to the data section
  uint64_t nbytes = 0;
  uint64_t numel() const;
  // The row-major (PyTorch) shape: dims reversed.
  std::vector<int64_t> shape() const;
};

struct Header {
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_start = 0;                              // absolute offset of the data section
  std::vector<std::pair<std::string, Value>> metadata;  // in file order
  std::map<std::string, size_t> metadata_index;
  std::vector<TensorInfo> tensors;  // in file order
  const Value* find(const std::string& key) const;
};

// Caps on what a header may declare, far above any real model, so a lying count cannot exhaust memory.
constexpr uint64_t kMaxTensorDims = 4;
constexpr uint64_t kMaxTensorName = 1024;
constexpr uint64_t kMaxArrayDepth = 4;
constexpr uint64_t kMaxArrayLength = 1ull << 24;  // the largest vocabularies have ~256k tokens

// Validates a complete GGUF file image: magic, version, every key/value, every tensor info (known type, whole blocks,
// byte size without overflow, aligned offset), the data section inside the file and tensors that do not overlap.
Header parse_header(const uint8_t* data, uint64_t size, const std::string& label);

class File {
 public:
  explicit File(const std::string& path);
  const std::string& path() const { return file_.path(); }
  const Header& header() const { return header_; }
  const uint8_t* data(const TensorInfo& t) const { return file_.data() + header_.data_start + t.offset; }
  const MappedFile& mapped() const { return file_; }

 private:
  MappedFile file_;
  Header header_;
};

struct SourceTensor {
  const File* file;
  const TensorInfo* info;
  const uint8_t* data() const { return file->data(*info); }
};

// A model in one GGUF file or split over several. Metadata comes from the first split; tensors from all of them.
class Model {
 public:
  // `path` is the single file or any split of a set; the others are found next to it by name.
  explicit Model(const std::string& path);
  const std::vector<std::unique_ptr<File>>& files() const { return files_; }
  const Header& header() const { return files_.front()->header(); }
  const Value* find(const std::string& key) const { return header().find(key); }
  const std::map<std::string, SourceTensor>& tensors() const { return tensors_; }
  const SourceTensor* tensor(const std::string& name) const;
  const std::string& label() const { return files_.front()->path(); }

 private:
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, SourceTensor> tensors_;
};

// The split set a path names: {prefix, index (1-based), count} for ".../NAME-00002-of-00005.gguf".
struct SplitName {
  std::string prefix;
  int index = 0, count = 0;
};
std::optional<SplitName> parse_split_name(const std::string& path);
std::string split_path(const std::string& prefix, int index, int count);

// True for a path ending in .gguf.
bool is_gguf_path(const std::string& path);

}  // namespace kiln::gguf
