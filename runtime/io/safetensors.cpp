#include "runtime/io/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"

namespace kiln {

using nlohmann::json;

static bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= uint64_t(d);
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

uint64_t TensorPlan::nbytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= uint64_t(d);
  return n;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, const std::string& label) {
  if (size < 8) throw Error(label + ": not a safetensors file (shorter than its 8-byte header length)");
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | data[i];
  if (hlen > kMaxSafetensorsHeader)
    throw Error(label + ": safetensors header length " + std::to_string(hlen) + " exceeds the " +
                std::to_string(kMaxSafetensorsHeader) + "-byte limit");
  if (hlen > size - 8)
    throw Error(label + ": safetensors header length " + std::to_string(hlen) + " runs past the end of the file (" +
                std::to_string(size) + " bytes); the file is truncated or corrupt");
  SafetensorsHeader h;
  h.data_start = 8 + hlen;
  const uint64_t data_size = size - h.data_start;

  // JSON objects keep the last of duplicate keys; a header naming a tensor twice is refused instead, since which of
  // the two descriptions the writer meant is unknowable.
  std::string duplicate;
  std::set<std::string> top_level_keys;
  json::parser_callback_t find_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && duplicate.empty() &&
        !top_level_keys.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  check_json_depth(std::string_view(reinterpret_cast<const char*>(data + 8), hlen), label + ": safetensors header");
  json j = json::parse(data + 8, data + 8 + hlen, find_duplicates, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw Error(label + ": safetensors header is not valid JSON");
  if (!duplicate.empty()) throw Error(label + ": safetensors header names tensor '" + duplicate + "' twice");
  if (!j.is_object()) throw Error(label + ": safetensors header is not a JSON object");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw Error(label + ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error(label + ": __metadata__ value '" + m.key() + "' is not a string");
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = label + ": tensor '" + name + "'";
    if (!v.is_object()) throw Error(where + " is not described by an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) throw Error(where + " has no dtype string");
    if (sh == v.end() || !sh->is_array()) throw Error(where + " has no shape array");
    if (off == v.end() || !off->is_array() || off->size() != 2)
      throw Error(where + " has no [begin, end] data_offsets");
    TensorInfo t;
    t.name = name;
    auto d = dtype_from_name(dt->get<std::string>());
    if (!d) throw Error(where + " has unknown dtype '" + dt->get<std::string>() + "'");
    t.dtype = *d;
    uint64_t bytes = dtype_size(t.dtype);
    for (const json& e : *sh) {
      if (!e.is_number_unsigned()) throw Error(where + " has a shape entry that is not a non-negative integer");
      uint64_t dim = e.get<uint64_t>();
      if (dim > (1ull << 48) || mul_overflows(bytes, dim, &bytes)) throw Error(where + " has an absurd shape");
      t.shape.push_back(int64_t(dim));
    }
    for (const json& e : *off)
      if (!e.is_number_unsigned()) throw Error(where + " has data_offsets that are not non-negative integers");
    t.begin = (*off)[0].get<uint64_t>();
    t.end = (*off)[1].get<uint64_t>();
    if (t.end < t.begin) throw Error(where + " has data_offsets with end before begin");
    if (t.end > data_size)
      throw Error(where + " lies past the end of the file (needs byte " + std::to_string(h.data_start + t.end) +
                  ", file has " + std::to_string(size) + "); the file is truncated or corrupt");
    if (t.end - t.begin != bytes)
      throw Error(where + " spans " + std::to_string(t.end - t.begin) + " bytes but its shape and dtype need " +
                  std::to_string(bytes));
    h.tensors.push_back(std::move(t));
  }

  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t cursor = 0;
  for (const TensorInfo* t : by_offset) {
    if (t->begin < cursor)
      throw Error(label + ": tensor '" + t->name + "' overlaps the bytes of another tensor (offset " +
                  std::to_string(t->begin) + ")");
    if (t->begin > cursor)
      throw Error(label + ": unreferenced gap in the data section before tensor '" + t->name + "'");
    cursor = t->end;
  }
  if (cursor != data_size)
    throw Error(label + ": data section has " + std::to_string(data_size - cursor) +
                " trailing bytes that no tensor references");
  return h;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  header_ = parse_safetensors_header(file_.data(), file_.size(), path);
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
}

SafetensorsFile::SafetensorsFile(MappedFile file, SafetensorsHeader header)
    : file_(std::move(file)), header_(std::move(header)) {
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

// ---- writer ----

static constexpr size_t kWriteBuffer = 8u << 20;

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<TensorPlan> plan,
                                     const std::map<std::string, std::string>& metadata)
    : path_(path) {
  // The header is ordered_json in plan order so the bytes depend only on the plan.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = m;
  }
  uint64_t offset = 0;
  for (const auto& t : plan) {
    uint64_t n = t.nbytes();
    header[t.name] = {
        {"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  expected_ = offset;
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');

  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error(path + ": cannot create: " + std::strerror(errno));
  uint8_t len[8];
  uint64_t hl = text.size();
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(hl >> (8 * i));
  write(len, 8);
  write(text.data(), text.size());
  header_done_ = true;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsWriter::count(size_t n) {
  if (!header_done_) return;
  if (written_ + n > expected_) throw Error(path_ + ": internal error: more tensor bytes than planned");
  written_ += n;
}

void SafetensorsWriter::write(const void* bytes, size_t n) {
  count(n);
  const uint8_t* p = static_cast<const uint8_t*>(bytes);
  while (n > 0) {
    if (!buf_) {
      // Reuse a buffer the hashing thread has released (only the pool still holds it), else make one.
      for (auto& b : pool_)
        if (b.use_count() == 1) buf_ = b;
      if (!buf_) {
        pool_.push_back(std::make_shared<std::vector<uint8_t>>(kWriteBuffer));
        buf_ = pool_.back();
      }
      buf_used_ = 0;
    }
    size_t take = std::min(n, buf_->size() - buf_used_);
    std::memcpy(buf_->data() + buf_used_, p, take);
    buf_used_ += take;
    p += take;
    n -= take;
    if (buf_used_ == buf_->size()) submit_buffer();
  }
}

void SafetensorsWriter::write_all(const uint8_t* p, size_t n) {
  size_t off = 0;
  while (off < n) {
    ssize_t w = ::write(fd_, p + off, n - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(path_ + ": write failed: " + std::strerror(errno));
    }
    off += size_t(w);
  }
  file_bytes_ += n;
}

void SafetensorsWriter::submit_buffer() {
  if (!buf_ || buf_used_ == 0) return;
  write_all(buf_->data(), buf_used_);
  hash_.submit(buf_->data(), buf_used_, buf_);
  buf_.reset();
  buf_used_ = 0;
}

void SafetensorsWriter::copy_range(const MappedFile& src, uint64_t offset, size_t n, std::function<void()> after) {
  count(n);
  submit_buffer();
  size_t done = 0;
  while (done < n) {
    loff_t in_off = loff_t(offset + done);
    ssize_t c = ::copy_file_range(src.fd(), &in_off, fd_, nullptr, n - done, 0);
    if (c < 0 && errno == EINTR) continue;
    if (c <= 0) {
      // Filesystems (or kernels) without in-kernel copy: fall back to writing from the map.
      if (c == 0 || errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP || errno == EBADF) {
        write_all(src.data() + offset + done, n - done);
        done = n;
        break;
      }
      throw Error(path_ + ": copy from " + src.path() + " failed: " + std::strerror(errno));
    }
    done += size_t(c);
    file_bytes_ += size_t(c);
  }
  hash_.submit(src.data() + offset, n, nullptr, std::move(after));
}

SafetensorsWriter::Result SafetensorsWriter::finish() {
  if (written_ != expected_)
    throw Error(path_ + ": internal error: wrote " + std::to_string(written_) + " tensor bytes, planned " +
                std::to_string(expected_));
  submit_buffer();
  std::string digest = hash_.finish();
  // No fsync: like cp, the bytes are left to the page cache. Atomicity against errors and interrupts comes from the
  // staging directory; flushing gigabytes synchronously would make convert several times slower than cp.
  if (::close(fd_) != 0) {
    fd_ = -1;
    throw Error(path_ + ": close failed: " + std::strerror(errno));
  }
  fd_ = -1;
  return {digest, file_bytes_};
}

}  // namespace kiln
