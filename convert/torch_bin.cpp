#include "convert/torch_bin.h"

#include <cstring>
#include <map>

#include "convert/torch_pickle.h"
#include "convert/torch_zip.h"
#include "runtime/core/error.h"

namespace kiln {

namespace {

bool mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

const ZipEntry* find_entry(const std::map<std::string, const ZipEntry*>& by_name, const std::string& name) {
  auto it = by_name.find(name);
  return it == by_name.end() ? nullptr : it->second;
}

// The archive's data.pkl: torch.save names every entry ARCHIVE/..., with one top-level folder.
std::string archive_prefix(const std::vector<ZipEntry>& entries, const std::string& label) {
  std::string prefix;
  int found = 0;
  for (const auto& e : entries) {
    const size_t slash = e.name.find('/');
    if (e.name == "data.pkl" ||
        (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0)) {
      prefix = e.name.substr(0, e.name.size() - std::strlen("data.pkl"));
      ++found;
    }
  }
  if (found == 0) throw Error(label + ": zip archive has no data.pkl; not a torch.save checkpoint");
  if (found > 1) throw Error(label + ": zip archive has more than one data.pkl");
  return prefix;
}

// Visits the element offsets of a strided view in row-major order, copying esz bytes each.
void copy_strided(const uint8_t* base, const TorchTensorRef& t, size_t esz, uint8_t* dst) {
  const size_t rank = t.shape.size();
  if (rank == 0) {
    std::memcpy(dst, base + t.offset * esz, esz);
    return;
  }
  std::vector<int64_t> index(rank, 0);
  const int64_t inner = t.shape[rank - 1], inner_stride = t.stride[rank - 1];
  while (true) {
    uint64_t off = t.offset;
    for (size_t d = 0; d + 1 < rank; ++d) off += uint64_t(index[d] * t.stride[d]);
    for (int64_t k = 0; k < inner; ++k, dst += esz)
      std::memcpy(dst, base + (off + uint64_t(k * inner_stride)) * esz, esz);
    size_t d = rank - 1;
    while (d-- > 0) {
      if (++index[d] < t.shape[d]) break;
      index[d] = 0;
    }
    if (d == SIZE_MAX) return;
  }
}

}  // namespace

TorchBinLayout plan_torch_bin(const uint8_t* data, uint64_t size, const std::string& path) {
  if (!looks_like_zip(data, size)) {
    if (size >= 2 && data[0] == 0x80 && data[1] <= 5)
      throw Error(path +
                  ": legacy torch.save format (not a zip archive, PyTorch < 1.6), which kiln does not read; "
                  "re-save it as safetensors (save_pretrained(safe_serialization=True)) and convert that");
    throw Error(path + ": not a torch.save zip archive");
  }
  const std::vector<ZipEntry> entries = read_stored_zip(data, size, path);
  std::map<std::string, const ZipEntry*> by_name;
  for (const auto& e : entries) by_name[e.name] = &e;
  const std::string prefix = archive_prefix(entries, path);
  if (const ZipEntry* bo = find_entry(by_name, prefix + "byteorder")) {
    const std::string order(reinterpret_cast<const char*>(data + bo->data_offset), bo->size);
    if (order != "little")
      throw Error(path + ": tensors are stored " + order + "-endian; kiln reads little-endian only");
  }
  const ZipEntry* pkl = find_entry(by_name, prefix + "data.pkl");
  const TorchStateDict sd = parse_torch_pickle(data + pkl->data_offset, pkl->size, path + " (data.pkl)");

  // Each storage is its zip entry, exactly.
  std::vector<const ZipEntry*> storage_entries;
  for (const auto& s : sd.storages) {
    const ZipEntry* e = find_entry(by_name, prefix + "data/" + s.key);
    if (!e)
      throw Error(path + ": storage '" + s.key + "' named by data.pkl has no zip entry " + prefix + "data/" + s.key);
    uint64_t bytes = 0;
    if (!mul(s.numel, dtype_size(s.dtype), &bytes) || bytes != e->size)
      throw Error(path + ": storage '" + s.key + "' declares " + std::to_string(s.numel) + " " +
                  std::string(dtype_name(s.dtype)) + " elements but its zip entry holds " + std::to_string(e->size) +
                  " bytes");
    storage_entries.push_back(e);
  }

  TorchBinLayout out;
  SafetensorsHeader &mapped = out.mapped, &materialized = out.materialized;
  uint64_t& copy_bytes = out.copy_bytes;
  for (const auto& t : sd.tensors) {
    const TorchStorageRef& s = sd.storages[t.storage];
    const uint64_t esz = dtype_size(s.dtype);
    const std::string where = path + ": tensor '" + t.name + "'";
    // Elements and the last element the view touches, refusing any overflow before a byte is trusted.
    uint64_t numel = 1, last = t.offset;
    bool ok = true;
    for (size_t d = 0; d < t.shape.size(); ++d) {
      ok &= mul(numel, uint64_t(t.shape[d]), &numel);
      uint64_t reach = 0;
      if (t.shape[d] > 0) ok &= mul(uint64_t(t.shape[d] - 1), uint64_t(t.stride[d]), &reach) && add(last, reach, &last);
    }
    uint64_t nbytes = 0;
    if (!ok || !mul(numel, esz, &nbytes)) throw Error(where + " has an absurd size " + shape_string(t.shape));
    if (numel > 0 && last >= s.numel)
      throw Error(where + " reaches element " + std::to_string(last) + " of storage '" + s.key + "', which holds " +
                  std::to_string(s.numel));
    // Row-major contiguous (dims of size 1 may have any stride): a run of the storage, mapped in place.
    bool contiguous = true;
    uint64_t expect = 1;
    for (size_t d = t.shape.size(); d-- > 0;) {
      if (t.shape[d] != 1 && uint64_t(t.stride[d]) != expect) contiguous = false;
      expect *= uint64_t(t.shape[d]);
    }
    TensorInfo info;
    info.name = t.name;
    info.dtype = s.dtype;
    info.shape = t.shape;
    if (contiguous || numel == 0) {
      info.begin = storage_entries[t.storage]->data_offset + (numel ? t.offset * esz : 0);
      info.end = info.begin + nbytes;
      mapped.tensors.push_back(std::move(info));
      continue;
    }
    // Materialized views could be expansions (stride 0) of a tiny storage; the copies together may not exceed the
    // file's own size, so a few bytes cannot ask for terabytes.
    if (!add(copy_bytes, nbytes, &copy_bytes) || copy_bytes > size)
      throw Error(where + " is a strided view of " + std::to_string(nbytes) +
                  " bytes; the views in this file would need more memory than the file's size");
    info.begin = copy_bytes - nbytes;
    info.end = copy_bytes;
    materialized.tensors.push_back(std::move(info));
    out.views.push_back({t, storage_entries[t.storage]->data_offset, esz});
  }
  return out;
}

void copy_views(const uint8_t* data, const TorchBinLayout& layout, uint8_t* dst) {
  for (size_t i = 0; i < layout.views.size(); ++i) {
    const auto& v = layout.views[i];
    copy_strided(data + v.storage_begin, v.view, v.element_size, dst + layout.materialized.tensors[i].begin);
  }
}

TorchBinFile open_torch_bin(const std::string& path) {
  MappedFile file(path);
  TorchBinLayout layout = plan_torch_bin(file.data(), file.size(), path);
  TorchBinFile out;
  if (!layout.views.empty()) {
    MappedFile copies = MappedFile::in_memory(path, size_t(layout.copy_bytes),
                                              [&](uint8_t* dst) { copy_views(file.data(), layout, dst); });
    out.materialized = std::make_unique<SafetensorsFile>(std::move(copies), std::move(layout.materialized));
  }
  out.mapped = std::make_unique<SafetensorsFile>(std::move(file), std::move(layout.mapped));
  return out;
}

}  // namespace kiln
