#include "convert/gguf_writer.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "runtime/core/error.h"

namespace kiln::gguf {

namespace {

constexpr uint64_t kAlignment = 32;

// resize + memcpy rather than insert(): GCC 12 reports false -Wstringop-overflow on vector<uint8_t>::insert here.
void put_bytes(std::vector<uint8_t>& b, const void* p, size_t n) {
  const size_t at = b.size();
  b.resize(at + n);
  if (n) std::memcpy(b.data() + at, p, n);
}

template <typename T>
void put(std::vector<uint8_t>& b, T v) {
  put_bytes(b, &v, sizeof(T));
}

void put_string(std::vector<uint8_t>& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  put_bytes(b, s.data(), s.size());
}

void put_value(std::vector<uint8_t>& b, const Value& v) {
  switch (v.type) {
    case ValueType::U8:
      put<uint8_t>(b, uint8_t(v.u));
      break;
    case ValueType::I8:
      put<int8_t>(b, int8_t(v.i));
      break;
    case ValueType::U16:
      put<uint16_t>(b, uint16_t(v.u));
      break;
    case ValueType::I16:
      put<int16_t>(b, int16_t(v.i));
      break;
    case ValueType::U32:
      put<uint32_t>(b, uint32_t(v.u));
      break;
    case ValueType::I32:
      put<int32_t>(b, int32_t(v.i));
      break;
    case ValueType::U64:
      put<uint64_t>(b, v.u);
      break;
    case ValueType::I64:
      put<int64_t>(b, v.i);
      break;
    case ValueType::F32:
      put<float>(b, float(v.f));
      break;
    case ValueType::F64:
      put<double>(b, v.f);
      break;
    case ValueType::BOOL:
      put<uint8_t>(b, v.u ? 1 : 0);
      break;
    case ValueType::STRING:
      put_string(b, v.s);
      break;
    case ValueType::ARRAY:
      put<uint32_t>(b, uint32_t(v.element_type));
      put<uint64_t>(b, v.items.size());
      for (const Value& item : v.items) put_value(b, item);
      break;
  }
}

}  // namespace

Writer::Writer(std::string path, bool force) : path_(std::move(path)) {
  std::error_code ec;
  if (std::filesystem::exists(path_, ec) && !force) throw Error(path_ + ": already exists (use --force to replace it)");
  tmp_ = path_ + ".tmp-" + std::to_string(::getpid());
  out_ = std::fopen(tmp_.c_str(), "wb");
  if (!out_) throw Error(tmp_ + ": cannot create: " + std::strerror(errno));
}

Writer::~Writer() {
  if (out_) std::fclose(out_);
  if (!finished_) std::remove(tmp_.c_str());
}

void Writer::add(const std::string& key, Value value) { metadata_.emplace_back(key, std::move(value)); }

void Writer::add_string(const std::string& key, const std::string& s) {
  Value v;
  v.type = ValueType::STRING;
  v.s = s;
  add(key, std::move(v));
}
void Writer::add_u32(const std::string& key, uint32_t x) {
  Value v;
  v.type = ValueType::U32;
  v.u = x;
  add(key, std::move(v));
}
void Writer::add_i32(const std::string& key, int32_t x) {
  Value v;
  v.type = ValueType::I32;
  v.i = x;
  add(key, std::move(v));
}
void Writer::add_f32(const std::string& key, float x) {
  Value v;
  v.type = ValueType::F32;
  v.f = x;
  add(key, std::move(v));
}
void Writer::add_bool(const std::string& key, bool x) {
  Value v;
  v.type = ValueType::BOOL;
  v.u = x;
  add(key, std::move(v));
}
void Writer::add_strings(const std::string& key, const std::vector<std::string>& items) {
  Value v;
  v.type = ValueType::ARRAY;
  v.element_type = ValueType::STRING;
  for (const auto& s : items) {
    Value e;
    e.type = ValueType::STRING;
    e.s = s;
    v.items.push_back(std::move(e));
  }
  add(key, std::move(v));
}
void Writer::add_i32s(const std::string& key, const std::vector<int32_t>& items) {
  Value v;
  v.type = ValueType::ARRAY;
  v.element_type = ValueType::I32;
  for (int32_t x : items) {
    Value e;
    e.type = ValueType::I32;
    e.i = x;
    v.items.push_back(std::move(e));
  }
  add(key, std::move(v));
}

void Writer::add_tensor(const std::string& name, const TensorType& type, std::vector<uint64_t> dims,
                        std::function<void(std::vector<uint8_t>&)> fill) {
  if (dims.empty() || dims[0] % type.block_size)
    throw Error("internal error: GGUF tensor '" + name + "' is not whole " + type.name + " blocks");
  uint64_t n = dims[0] / type.block_size * type.type_size;
  for (size_t d = 1; d < dims.size(); ++d) n *= dims[d];
  tensors_.push_back({name, &type, std::move(dims), n, std::move(fill)});
}

void Writer::write(const void* p, size_t n) {
  if (n && std::fwrite(p, 1, n, out_) != n) throw Error(tmp_ + ": write failed: " + std::strerror(errno));
}

void Writer::finish() {
  std::vector<uint8_t> head = {'G', 'G', 'U', 'F'};
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, metadata_.size());
  for (const auto& [key, value] : metadata_) {
    put_string(head, key);
    put<uint32_t>(head, uint32_t(value.type));
    put_value(head, value);
  }
  uint64_t offset = 0;
  for (const Pending& t : tensors_) {
    put_string(head, t.name);
    put<uint32_t>(head, uint32_t(t.dims.size()));
    for (uint64_t d : t.dims) put<uint64_t>(head, d);
    put<uint32_t>(head, t.type->id);
    put<uint64_t>(head, offset);
    offset += (t.nbytes + kAlignment - 1) / kAlignment * kAlignment;
  }
  head.resize((head.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
  write(head.data(), head.size());
  std::vector<uint8_t> bytes;
  for (const Pending& t : tensors_) {
    bytes.clear();
    t.fill(bytes);
    if (bytes.size() != t.nbytes)
      throw Error("internal error: GGUF tensor '" + t.name + "' produced " + std::to_string(bytes.size()) +
                  " bytes, expected " + std::to_string(t.nbytes));
    bytes.resize((bytes.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
    write(bytes.data(), bytes.size());
  }
  if (std::fclose(out_) != 0) {
    out_ = nullptr;
    throw Error(tmp_ + ": close failed: " + std::strerror(errno));
  }
  out_ = nullptr;
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) throw Error(path_ + ": cannot move the finished file into place: " + ec.message());
  finished_ = true;
}

}  // namespace kiln::gguf
