#pragma once
// A torch.save checkpoint file (pytorch_model.bin, or one shard of pytorch_model.bin.index.json) presented as the
// tensors of SafetensorsFile views, so the converter reads it like safetensors: the zip is parsed (torch_zip.h), its
// data.pkl interpreted without executing anything (torch_pickle.h), and each tensor bounds-checked against its
// storage and each storage against its zip entry.
#include <memory>
#include <string>

#include "convert/torch_pickle.h"
#include "runtime/io/safetensors.h"

namespace kiln {

struct TorchBinFile {
  // Tensors that are contiguous runs of their storage, mapped in place in the .bin (tied weights share bytes).
  std::unique_ptr<SafetensorsFile> mapped;
  // Strided views (transposes, expanded or gapped tensors) copied into memory in row-major order; null when none.
  // Its path() is the .bin's, so messages name the real file.
  std::unique_ptr<SafetensorsFile> materialized;
};

// Where each tensor of a torch.save file image lies, every range checked against the image: contiguous tensors as
// offsets into it (data_start 0), strided views as offsets into a row-major copy of copy_bytes bytes (never more than
// the image's size) that copy_views fills.
struct TorchBinLayout {
  SafetensorsHeader mapped;
  SafetensorsHeader materialized;
  uint64_t copy_bytes = 0;
  struct View {
    TorchTensorRef view;     // in elements of its storage
    uint64_t storage_begin;  // the storage's offset in the image
    size_t element_size;
  };
  std::vector<View> views;  // one per materialized tensor, in the same order
};
TorchBinLayout plan_torch_bin(const uint8_t* data, uint64_t size, const std::string& path);
void copy_views(const uint8_t* data, const TorchBinLayout& layout, uint8_t* dst);

// Throws kiln::Error naming `path` on anything malformed, hostile or unsupported, including the legacy (pre-1.6,
// non-zip) torch.save format.
TorchBinFile open_torch_bin(const std::string& path);

}  // namespace kiln
