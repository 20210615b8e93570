#pragma once
// A torch.save checkpoint file (pytorch_model.bin, or one shard of pytorch_model.bin.index.json) presented as the
// tensors of SafetensorsFile views, so the converter reads it like safetensors: the zip is parsed (torch_zip.h), its
// data.pkl interpreted without executing anything (torch_pickle.h), and each tensor bounds-checked against its
// storage and each storage against its zip entry.
#include <memory>
#include <string>

#include "runtime/io/safetensors.h"

namespace kiln {

struct TorchBinFile {
  // Tensors that are contiguous runs of their storage, mapped in place in the .bin (tied weights share bytes).
  std::unique_ptr<SafetensorsFile> mapped;
  // Strided views (transposes, expanded or gapped tensors) copied into memory in row-major order; null when none.
  // Its path() is the .bin's, so messages name the real file.
  std::unique_ptr<SafetensorsFile> materialized;
};

// Throws kiln::Error naming `path` on anything malformed, hostile or unsupported, including the legacy (pre-1.6,
// non-zip) torch.save format.
TorchBinFile open_torch_bin(const std::string& path);

}  // namespace kiln
