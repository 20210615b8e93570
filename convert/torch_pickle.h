#pragma once
// A restricted unpickler for the data.pkl of a torch.save state dict. It interprets the pickle opcodes as data only:
// the few globals torch.save emits for a state dict (collections.OrderedDict, torch._utils._rebuild_tensor_v2 and
// _rebuild_parameter, the typed storage classes) are recognised by name and turned into descriptions, and any other
// global is refused the moment it is named, so nothing in the file is ever called. Memo, stack, object count and
// nesting depth are bounded, so a hostile pickle costs bounded memory and time.
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"

namespace kiln {

// A storage named by a persistent id ('storage', torch.FloatStorage, KEY, LOCATION, NUMEL); its bytes are the zip
// entry ARCHIVE/data/KEY.
struct TorchStorageRef {
  std::string key;
  DType dtype = DType::F32;
  uint64_t numel = 0;
};

// A tensor as torch rebuilds it: a strided view of one storage, in elements.
struct TorchTensorRef {
  std::string name;
  size_t storage = 0;  // index into TorchStateDict::storages
  uint64_t offset = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> stride;
};

struct TorchStateDict {
  std::vector<TorchStorageRef> storages;  // each key once, tensors sharing a storage point at the same one
  std::vector<TorchTensorRef> tensors;    // in pickle order
};

// Bounds that no real state dict comes near; exceeding one is refused rather than allocated.
constexpr uint64_t kMaxPickleBytes = 256ull << 20;
constexpr uint64_t kMaxPickleObjects = 1u << 21;
constexpr int kMaxPickleDepth = 64;

// Interprets a data.pkl whose top-level object is a dict (or OrderedDict) of name -> tensor. Throws kiln::Error naming
// `label` on an unknown opcode or global, malformed data, a bound exceeded, or a value that is not a tensor.
TorchStateDict parse_torch_pickle(const uint8_t* data, uint64_t size, const std::string& label);

}  // namespace kiln
