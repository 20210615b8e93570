#include "convert/gguf_file.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>

#include "runtime/core/error.h"

namespace kiln::gguf {

namespace {

constexpr uint64_t kQK = 256;  // super-block size of the K-quants and most IQ types

// Every ggml type a GGUF file may name, with its block geometry (ggml's type_traits).
const TensorType kTypes[] = {
    {0, "F32", 1, 4},
    {1, "F16", 1, 2},
    {2, "Q4_0", 32, 2 + 16},
    {3, "Q4_1", 32, 2 + 2 + 16},
    {6, "Q5_0", 32, 2 + 4 + 16},
    {7, "Q5_1", 32, 2 + 2 + 4 + 16},
    {8, "Q8_0", 32, 2 + 32},
    {9, "Q8_1", 32, 4 + 4 + 32},
    {10, "Q2_K", kQK, 2 + 2 + kQK / 16 + kQK / 4},
    {11, "Q3_K", kQK, 2 + kQK / 4 + kQK / 8 + 12},
    {12, "Q4_K", kQK, 2 + 2 + kQK / 2 + 12},
    {13, "Q5_K", kQK, 2 + 2 + kQK / 2 + kQK / 8 + 12},
    {14, "Q6_K", kQK, 2 + kQK / 2 + kQK / 4 + kQK / 16},
    {15, "Q8_K", kQK, 4 + kQK + kQK / 8},
    {16, "IQ2_XXS", kQK, 2 + kQK / 4},
    {17, "IQ2_XS", kQK, 2 + kQK / 4 + kQK / 32},
    {18, "IQ3_XXS", kQK, 2 + kQK / 4 + kQK / 8},
    {19, "IQ1_S", kQK, 2 + kQK / 8 + kQK / 16},
    {20, "IQ4_NL", 32, 2 + 16},
    {21, "IQ3_S", kQK, 2 + kQK / 4 + kQK / 8 + kQK / 32 + 4},
    {22, "IQ2_S", kQK, 2 + kQK / 4 + kQK / 16},
    {23, "IQ4_XS", kQK, 2 + 2 + kQK / 2 + kQK / 64},
    {24, "I8", 1, 1},
    {25, "I16", 1, 2},
    {26, "I32", 1, 4},
    {27, "I64", 1, 8},
    {28, "F64", 1, 8},
    {29, "IQ1_M", kQK, kQK / 8 + kQK / 16 + kQK / 32},
    {30, "BF16", 1, 2},
    {34, "TQ1_0", kQK, 2 + 4 * 13},
    {35, "TQ2_0", kQK, 2 + 64},
    {39, "MXFP4", 32, 1 + 16},
    {40, "NVFP4", 64, 4 + 32},
    {41, "Q1_0", 128, 2 + 16},
};

// A cursor over the file image that refuses to read past its end.
class Reader {
 public:
  Reader(const uint8_t* data, uint64_t size, const std::string& label) : p_(data), size_(size), label_(label) {}
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  [[noreturn]] void fail(const std::string& what) const { throw Error(label_ + ": " + what); }
  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      fail(what + " runs past the end of the file (needs " + std::to_string(n) + " bytes at offset " +
           std::to_string(pos_) + ", " + std::to_string(left()) + " left); the file is truncated or corrupt");
  }
  template <typename T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));  // GGUF is little-endian, as is every host kiln runs on
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& what) {
    uint64_t n = get<uint64_t>(what + " length");
    need(n, what + " (" + std::to_string(n) + " bytes)");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), size_t(n));
    pos_ += n;
    return s;
  }

 private:
  const uint8_t* p_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& label_;
};

bool valid_value_type(uint32_t t) { return t <= uint32_t(ValueType::F64); }

// The fewest bytes one value of type t occupies, to bound array counts before allocating.
uint64_t min_value_size(ValueType t) {
  switch (t) {
    case ValueType::U8:
    case ValueType::I8:
    case ValueType::BOOL:
      return 1;
    case ValueType::U16:
    case ValueType::I16:
      return 2;
    case ValueType::U32:
    case ValueType::I32:
    case ValueType::F32:
      return 4;
    case ValueType::STRING:
    case ValueType::U64:
    case ValueType::I64:
    case ValueType::F64:
      return 8;
    case ValueType::ARRAY:
      return 12;
  }
  return 1;
}

Value read_value(Reader& r, ValueType type, const std::string& what, uint64_t depth) {
  Value v;
  v.type = type;
  switch (type) {
    case ValueType::U8:
      v.u = r.get<uint8_t>(what);
      break;
    case ValueType::I8:
      v.i = r.get<int8_t>(what);
      break;
    case ValueType::U16:
      v.u = r.get<uint16_t>(what);
      break;
    case ValueType::I16:
      v.i = r.get<int16_t>(what);
      break;
    case ValueType::U32:
      v.u = r.get<uint32_t>(what);
      break;
    case ValueType::I32:
      v.i = r.get<int32_t>(what);
      break;
    case ValueType::U64:
      v.u = r.get<uint64_t>(what);
      break;
    case ValueType::I64:
      v.i = r.get<int64_t>(what);
      break;
    case ValueType::F32:
      v.f = r.get<float>(what);
      break;
    case ValueType::F64:
      v.f = r.get<double>(what);
      break;
    case ValueType::BOOL: {
      uint8_t b = r.get<uint8_t>(what);
      if (b > 1) r.fail(what + " is a bool holding " + std::to_string(b) + " (must be 0 or 1)");
      v.u = b;
      break;
    }
    case ValueType::STRING:
      v.s = r.string(what);
      break;
    case ValueType::ARRAY: {
      if (depth >= kMaxArrayDepth) r.fail(what + " nests arrays deeper than " + std::to_string(kMaxArrayDepth));
      uint32_t et = r.get<uint32_t>(what + " element type");
      if (!valid_value_type(et)) r.fail(what + " has unknown array element type " + std::to_string(et));
      v.element_type = ValueType(et);
      uint64_t n = r.get<uint64_t>(what + " element count");
      if (n > kMaxArrayLength)
        r.fail(what + " claims " + std::to_string(n) + " elements, more than the " + std::to_string(kMaxArrayLength) +
               " kiln accepts");
      if (n > r.left() / min_value_size(v.element_type))
        r.fail(what + " claims " + std::to_string(n) + " " + value_type_name(v.element_type) +
               " elements, more than the rest of the file can hold");
      v.items.reserve(size_t(n));
      for (uint64_t k = 0; k < n; ++k)
        v.items.push_back(read_value(r, v.element_type, what + "[" + std::to_string(k) + "]", depth + 1));
      break;
    }
  }
  return v;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

const char* value_type_name(ValueType t) {
  static const char* names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                "bool", "string", "array", "u64", "i64", "f64"};
  return uint32_t(t) <= uint32_t(ValueType::F64) ? names[uint32_t(t)] : "?";
}

bool Value::is_integer() const {
  return type == ValueType::U8 || type == ValueType::I8 || type == ValueType::U16 || type == ValueType::I16 ||
         type == ValueType::U32 || type == ValueType::I32 || type == ValueType::U64 || type == ValueType::I64;
}

std::optional<int64_t> Value::as_int() const {
  switch (type) {
    case ValueType::U8:
    case ValueType::U16:
    case ValueType::U32:
      return int64_t(u);
    case ValueType::U64:
      if (u > uint64_t(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return int64_t(u);
    case ValueType::I8:
    case ValueType::I16:
    case ValueType::I32:
    case ValueType::I64:
      return i;
    default:
      return std::nullopt;
  }
}

std::optional<double> Value::as_number() const {
  if (is_float()) return f;
  if (type == ValueType::U64) return double(u);
  if (auto v = as_int()) return double(*v);
  return std::nullopt;
}

std::string Value::summary(size_t max_chars) const {
  switch (type) {
    case ValueType::BOOL:
      return u ? "true" : "false";
    case ValueType::STRING: {
      std::string out;
      for (char c : s.substr(0, max_chars)) out += c == '\n' ? std::string("\\n") : std::string(1, c);
      return s.size() > max_chars ? out + "... (" + std::to_string(s.size()) + " bytes)" : out;
    }
    case ValueType::ARRAY:
      return "[" + std::to_string(items.size()) + " " + value_type_name(element_type) + "]";
    case ValueType::F32:
    case ValueType::F64: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%g", f);
      return buf;
    }
    case ValueType::U8:
    case ValueType::U16:
    case ValueType::U32:
    case ValueType::U64:
      return std::to_string(u);
    default:
      return std::to_string(i);
  }
}

const TensorType* find_tensor_type(uint32_t id) {
  for (const TensorType& t : kTypes)
    if (t.id == id) return &t;
  return nullptr;
}

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (uint64_t d : dims) n *= d;
  return n;
}

std::vector<int64_t> TensorInfo::shape() const { return std::vector<int64_t>(dims.rbegin(), dims.rend()); }

const Value* Header::find(const std::string& key) const {
  auto it = metadata_index.find(key);
  return it == metadata_index.end() ? nullptr : &metadata[it->second].second;
}

Header parse_header(const uint8_t* data, uint64_t size, const std::string& label) {
  Reader r(data, size, label);
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0) r.fail("not a GGUF file (no 'GGUF' magic)");
  r.get<uint32_t>("magic");
  Header h;
  h.version = r.get<uint32_t>("GGUF version");
  if (h.version == 1) r.fail("GGUF version 1 is not supported (kiln reads versions 2 and 3)");
  if (h.version > 0xffff && (h.version & 0xffff) == 0)
    r.fail("big-endian GGUF is not supported (kiln reads little-endian files)");
  if (h.version != 2 && h.version != 3)
    r.fail("unknown GGUF version " + std::to_string(h.version) + " (kiln reads versions 2 and 3)");
  const uint64_t n_tensors = r.get<uint64_t>("tensor count");
  const uint64_t n_kv = r.get<uint64_t>("metadata key/value count");
  // A key/value needs at least a key length, a type and one byte; a tensor info a name length, n_dims, a type, an
  // offset. Counts beyond that are lies.
  if (n_kv > r.left() / 13)
    r.fail("claims " + std::to_string(n_kv) + " metadata key/values, more than the file can hold");
  if (n_tensors > r.left() / 24)
    r.fail("claims " + std::to_string(n_tensors) + " tensors, more than the file can hold");

  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = r.string("metadata key #" + std::to_string(k));
    if (key.empty()) r.fail("metadata key #" + std::to_string(k) + " is empty");
    const std::string what = "metadata '" + key + "'";
    uint32_t type = r.get<uint32_t>(what + " type");
    if (!valid_value_type(type)) r.fail(what + " has unknown value type " + std::to_string(type));
    Value v = read_value(r, ValueType(type), what, 0);
    if (!h.metadata_index.emplace(key, h.metadata.size()).second) r.fail(what + " appears twice");
    h.metadata.emplace_back(std::move(key), std::move(v));
  }

  if (const Value* a = h.find("general.alignment")) {
    auto n = a->as_int();
    if (a->type != ValueType::U32 || !n || *n == 0 || (*n & (*n - 1)) != 0)
      r.fail("metadata 'general.alignment' must be a u32 power of two, not " + a->summary());
    h.alignment = uint64_t(*n);
  }

  std::map<std::string, size_t> names;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    t.name = r.string("tensor info #" + std::to_string(k) + " name");
    if (t.name.empty() || t.name.size() > kMaxTensorName)
      r.fail("tensor info #" + std::to_string(k) + " has a name of " + std::to_string(t.name.size()) + " bytes");
    const std::string what = "tensor '" + t.name + "'";
    uint32_t n_dims = r.get<uint32_t>(what + " dimension count");
    if (n_dims == 0 || n_dims > kMaxTensorDims)
      r.fail(what + " has " + std::to_string(n_dims) + " dimensions (1 to " + std::to_string(kMaxTensorDims) + ")");
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = r.get<uint64_t>(what + " dimension");
      if (dim == 0 || dim > (1ull << 48)) r.fail(what + " has an absurd dimension " + std::to_string(dim));
      t.dims.push_back(dim);
    }
    uint32_t type = r.get<uint32_t>(what + " type");
    t.type = find_tensor_type(type);
    if (!t.type) r.fail(what + " has unknown ggml type " + std::to_string(type));
    t.offset = r.get<uint64_t>(what + " offset");
    if (t.dims[0] % t.type->block_size)
      r.fail(what + " has " + std::to_string(t.dims[0]) + " elements per row, not a multiple of the " + t.type->name +
             " block size " + std::to_string(t.type->block_size));
    uint64_t bytes = t.dims[0] / t.type->block_size * t.type->type_size;
    for (size_t d = 1; d < t.dims.size(); ++d)
      if (mul_overflows(bytes, t.dims[d], &bytes)) r.fail(what + " has an absurd shape");
    t.nbytes = bytes;
    if (t.offset % h.alignment)
      r.fail(what + " has offset " + std::to_string(t.offset) + ", not a multiple of the alignment " +
             std::to_string(h.alignment));
    if (!names.emplace(t.name, h.tensors.size()).second) r.fail(what + " appears twice");
    h.tensors.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment (the padding may be cut off if there is no data).
  uint64_t start = r.pos() + (h.alignment - r.pos() % h.alignment) % h.alignment;
  h.data_start = std::min<uint64_t>(start, size);
  const uint64_t data_size = size - h.data_start;
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : h.tensors) {
    if (t.offset > data_size || t.nbytes > data_size - t.offset)
      r.fail("tensor '" + t.name + "' lies past the end of the file (needs bytes up to " +
             std::to_string(h.data_start + t.offset + t.nbytes) + ", file has " + std::to_string(size) +
             "); the file is truncated or corrupt");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k)
    if (by_offset[k]->offset < by_offset[k - 1]->offset + by_offset[k - 1]->nbytes)
      r.fail("tensor '" + by_offset[k]->name + "' overlaps the bytes of tensor '" + by_offset[k - 1]->name + "'");
  return h;
}

File::File(const std::string& path) : file_(path) { header_ = parse_header(file_.data(), file_.size(), path); }

// ---- split sets ----

std::optional<SplitName> parse_split_name(const std::string& path) {
  // PREFIX-NNNNN-of-MMMMM.gguf
  const std::string tail = "-00000-of-00000.gguf";
  if (path.size() <= tail.size()) return std::nullopt;
  const std::string t = path.substr(path.size() - tail.size());
  auto digits = [&](size_t at) {
    int v = 0;
    for (size_t k = at; k < at + 5; ++k) {
      if (t[k] < '0' || t[k] > '9') return -1;
      v = v * 10 + (t[k] - '0');
    }
    return v;
  };
  if (t[0] != '-' || t.compare(6, 4, "-of-") != 0 || t.compare(15, 5, ".gguf") != 0) return std::nullopt;
  SplitName s{path.substr(0, path.size() - tail.size()), digits(1), digits(10)};
  if (s.index < 1 || s.count < 1 || s.index > s.count) return std::nullopt;
  return s;
}

std::string split_path(const std::string& prefix, int index, int count) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "-%05d-of-%05d.gguf", index, count);
  return prefix + buf;
}

bool is_gguf_path(const std::string& path) { return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0; }

namespace {

// split.no / split.count of one file, checked against its place in the set.
void check_split_keys(const File& f, int index, int count) {
  const Value* no = f.header().find("split.no");
  const Value* n = f.header().find("split.count");
  if (count == 1 && !n) return;
  if (!no || !n || !no->as_int() || !n->as_int())
    throw Error(f.path() + ": a split GGUF file needs integer 'split.no' and 'split.count' metadata");
  if (*n->as_int() != count || *no->as_int() != index - 1)
    throw Error(f.path() + ": metadata says split " + std::to_string(*no->as_int() + 1) + " of " +
                std::to_string(*n->as_int()) + ", but its name says " + std::to_string(index) + " of " +
                std::to_string(count));
}

}  // namespace

Model::Model(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(path + ": no such file");
  if (auto split = parse_split_name(path)) {
    for (int k = 1; k <= split->count; ++k) {
      std::string p = split_path(split->prefix, k, split->count);
      if (!std::filesystem::is_regular_file(p, ec))
        throw Error(p + ": split " + std::to_string(k) + " of " + std::to_string(split->count) + " is missing");
      files_.push_back(std::make_unique<File>(p));
      check_split_keys(*files_.back(), k, split->count);
    }
  } else {
    files_.push_back(std::make_unique<File>(path));
    if (const Value* n = files_.back()->header().find("split.count"); n && n->as_int() && *n->as_int() > 1)
      throw Error(path + ": metadata says this is one of " + std::to_string(*n->as_int()) +
                  " split files, but the name does not follow NAME-00001-of-0000N.gguf");
  }
  for (const auto& f : files_)
    for (const TensorInfo& t : f->header().tensors) {
      auto [it, inserted] = tensors_.emplace(t.name, SourceTensor{f.get(), &t});
      if (!inserted) throw Error(f->path() + ": tensor '" + t.name + "' also appears in " + it->second.file->path());
    }
  if (const Value* total = header().find("split.tensors.count");
      total && total->as_int() && uint64_t(*total->as_int()) != tensors_.size())
    throw Error(label() + ": metadata 'split.tensors.count' says " + std::to_string(*total->as_int()) +
                " tensors, the split files hold " + std::to_string(tensors_.size()));
}

const SourceTensor* Model::tensor(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace kiln::gguf
