#include "convert/torch_zip.h"

#include <algorithm>
#include <set>

#include "runtime/core/error.h"

namespace kiln {

namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kEndSize = 22, kZip64EndSize = 56, kZip64LocatorSize = 20;
constexpr uint64_t kCentralSize = 46, kLocalSize = 30;
// More entries than any checkpoint has (one per storage); bounds the work a hostile directory can ask for.
constexpr uint64_t kMaxEntries = 1u << 20;

// Little-endian reads at an offset the caller has checked against the image size.
uint64_t le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

struct Reader {
  const uint8_t* data;
  uint64_t size;
  const std::string& label;
  [[noreturn]] void fail(const std::string& what) const { throw Error(label + ": " + what); }
  // Throws unless [offset, offset + n) lies inside the image.
  const uint8_t* at(uint64_t offset, uint64_t n, const char* what) const {
    if (offset > size || n > size - offset)
      fail(std::string(what) + " lies past the end of the file; truncated or corrupt zip");
    return data + offset;
  }
};

struct Directory {
  uint64_t entries = 0, offset = 0, size = 0;
};

Directory find_directory(const Reader& r) {
  if (r.size < kEndSize) r.fail("too short to be a zip archive");
  // The end record is the last 22 bytes plus a comment of up to 65535 bytes; the comment must reach the end exactly.
  uint64_t end = UINT64_MAX;
  const uint64_t lowest = r.size > kEndSize + 0xffff ? r.size - kEndSize - 0xffff : 0;
  for (uint64_t pos = r.size - kEndSize + 1; pos-- > lowest;) {
    const uint8_t* p = r.data + pos;
    if (le(p, 4) == kEndSig && pos + kEndSize + le(p + 20, 2) == r.size) {
      end = pos;
      break;
    }
  }
  if (end == UINT64_MAX) r.fail("no zip end-of-central-directory record; not a zip archive, or truncated");
  const uint8_t* e = r.data + end;
  if (le(e + 4, 2) != 0 || le(e + 6, 2) != 0 || le(e + 8, 2) != le(e + 10, 2))
    r.fail("multi-disk zip archives are not supported");
  Directory d{le(e + 10, 2), le(e + 16, 4), le(e + 12, 4)};
  const bool needs_zip64 = d.entries == 0xffff || d.offset == 0xffffffff || d.size == 0xffffffff;
  const bool has_locator = end >= kZip64LocatorSize && le(r.data + end - kZip64LocatorSize, 4) == kZip64LocatorSig;
  if (has_locator) {
    const uint8_t* loc = r.data + end - kZip64LocatorSize;
    if (le(loc + 4, 4) != 0 || le(loc + 16, 4) != 1) r.fail("multi-disk zip64 archives are not supported");
    const uint64_t z_off = le(loc + 8, 8);
    if (z_off > end - kZip64LocatorSize) r.fail("zip64 end record lies outside the file");
    const uint8_t* z = r.at(z_off, kZip64EndSize, "zip64 end record");
    if (le(z, 4) != kZip64EndSig) r.fail("zip64 locator does not point at a zip64 end record");
    if (le(z + 16, 4) != 0 || le(z + 20, 4) != 0 || le(z + 24, 8) != le(z + 32, 8))
      r.fail("multi-disk zip64 archives are not supported");
    d = {le(z + 32, 8), le(z + 48, 8), le(z + 40, 8)};
  } else if (needs_zip64) {
    r.fail("zip end record defers to a zip64 record that is missing");
  }
  if (d.entries > kMaxEntries)
    r.fail("zip directory lists " + std::to_string(d.entries) + " entries, too many for a checkpoint");
  r.at(d.offset, d.size, "zip central directory");
  return d;
}

// Replaces the 32-bit fields that are 0xffffffff with the values of the zip64 extra field, in the order the format
// fixes: uncompressed size, compressed size, local header offset.
void apply_zip64_extra(const Reader& r, const uint8_t* extra, uint64_t extra_len, uint64_t* fields[3],
                       const std::string& name) {
  uint64_t pos = 0;
  while (pos + 4 <= extra_len) {
    const uint64_t id = le(extra + pos, 2), len = le(extra + pos + 2, 2);
    if (pos + 4 + len > extra_len) r.fail("entry '" + name + "' has a malformed extra field");
    if (id == 0x0001) {
      uint64_t used = 0;
      for (int i = 0; i < 3; ++i) {
        if (*fields[i] != 0xffffffff) continue;
        if (used + 8 > len) r.fail("entry '" + name + "' has a zip64 field too short for its sizes");
        *fields[i] = le(extra + pos + 4 + used, 8);
        used += 8;
      }
    }
    pos += 4 + len;
  }
  for (int i = 0; i < 3; ++i)
    if (*fields[i] == 0xffffffff) r.fail("entry '" + name + "' defers a size to a zip64 field that is missing");
}

}  // namespace

bool looks_like_zip(const uint8_t* data, uint64_t size) { return size >= 4 && le(data, 4) == kLocalHeaderSig; }

std::vector<ZipEntry> read_stored_zip(const uint8_t* data, uint64_t size, const std::string& label) {
  const Reader r{data, size, label};
  const Directory dir = find_directory(r);
  struct Span {
    uint64_t header, end;
    size_t index;
  };
  std::vector<ZipEntry> out;
  std::vector<Span> spans;
  std::set<std::string> names;
  uint64_t pos = dir.offset;
  const uint64_t dir_end = dir.offset + dir.size;
  for (uint64_t i = 0; i < dir.entries; ++i) {
    if (pos > dir_end || kCentralSize > dir_end - pos) r.fail("zip central directory is shorter than its entry count");
    const uint8_t* c = data + pos;
    if (le(c, 4) != kCentralHeaderSig) r.fail("zip central directory entry " + std::to_string(i) + " is malformed");
    const uint64_t flags = le(c + 8, 2), method = le(c + 10, 2);
    uint64_t compressed = le(c + 20, 4), uncompressed = le(c + 24, 4), header = le(c + 42, 4);
    const uint64_t name_len = le(c + 28, 2), extra_len = le(c + 30, 2), comment_len = le(c + 32, 2);
    if (kCentralSize + name_len + extra_len + comment_len > dir_end - pos)
      r.fail("zip central directory entry " + std::to_string(i) + " runs past the directory");
    std::string name(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    if (name.empty() || name.find('\0') != std::string::npos)
      r.fail("zip entry " + std::to_string(i) + " has an invalid name");
    if (flags & 0x41) r.fail("entry '" + name + "' is encrypted");
    if (method != 0)
      r.fail("entry '" + name + "' is compressed (method " + std::to_string(method) +
             "); torch.save stores entries uncompressed, and kiln maps them in place");
    if (le(c + 34, 2) != 0 && le(c + 34, 2) != 0xffff) r.fail("entry '" + name + "' is on another disk");
    uint64_t* fields[3] = {&uncompressed, &compressed, &header};
    apply_zip64_extra(r, c + kCentralSize + name_len, extra_len, fields, name);
    if (compressed != uncompressed)
      r.fail("entry '" + name + "' is stored but declares " + std::to_string(uncompressed) + " bytes, not " +
             std::to_string(compressed));
    if (!names.insert(name).second) r.fail("entry '" + name + "' appears twice in the zip directory");

    const uint8_t* l = r.at(header, kLocalSize, ("entry '" + name + "' local header").c_str());
    if (le(l, 4) != kLocalHeaderSig) r.fail("entry '" + name + "' has no local header where the directory says");
    const uint64_t l_name = le(l + 26, 2), l_extra = le(l + 28, 2);
    r.at(header + kLocalSize, l_name + l_extra, ("entry '" + name + "' local header").c_str());
    if (l_name != name_len || std::string(reinterpret_cast<const char*>(l + kLocalSize), l_name) != name)
      r.fail("entry '" + name + "' has a local header naming another file");
    if (le(l + 8, 2) != method) r.fail("entry '" + name + "' local header disagrees on the compression method");
    const uint64_t begin = header + kLocalSize + l_name + l_extra;
    r.at(begin, uncompressed, ("entry '" + name + "' data").c_str());
    if (begin + uncompressed > dir.offset) r.fail("entry '" + name + "' data runs into the zip central directory");
    spans.push_back({header, begin + uncompressed, out.size()});
    out.push_back({name, begin, uncompressed});
    pos += kCentralSize + name_len + extra_len + comment_len;
  }
  // Entries sharing bytes are how zip bombs multiply a small file; a checkpoint's storages never do.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.header < b.header; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].header < spans[i - 1].end)
      r.fail("entries '" + out[spans[i - 1].index].name + "' and '" + out[spans[i].index].name + "' overlap");
  return out;
}

}  // namespace kiln
