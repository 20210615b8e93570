#pragma once
// The zip container of torch.save (PyTorch >= 1.6): a central directory of *stored* (uncompressed) entries, the
// pickle ARCHIVE/data.pkl and one entry per storage, ARCHIVE/data/KEY, each 64-byte aligned so it can be mapped in
// place.
//
// Written here rather than taken from libzip or minizip: both are built to extract (copy or inflate) an entry, and
// neither hands back simply the file offset of a stored entry's bytes, which is all that mapping storages in place
// needs. The reader accepts only what a zero-copy map can trust: stored entries, sizes that agree, entries inside the
// file and not overlapping one another, zip64 as torch's writer (miniz) emits it. Everything else is refused.
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;  // absolute offset of the entry's bytes in the file
  uint64_t size = 0;
};

// Parses the central directory of a complete zip image. Throws kiln::Error naming `label` on anything malformed or
// unsupported (compressed or encrypted entries, multi-disk archives, overlapping or out-of-bounds entries, duplicate
// names).
std::vector<ZipEntry> read_stored_zip(const uint8_t* data, uint64_t size, const std::string& label);

// True when the bytes begin like a zip archive (a local file header).
bool looks_like_zip(const uint8_t* data, uint64_t size);

}  // namespace kiln
