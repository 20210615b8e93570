// libFuzzer target: a torch.save checkpoint image (zip reader, restricted unpickler, storage and view bounds) and a
// bare data.pkl must be refused with kiln::Error, never crash or read out of bounds; whatever is accepted must lie
// inside the input, and its strided views must copy (under ASan) from inside the input only.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "convert/torch_bin.h"
#include "convert/torch_pickle.h"
#include "runtime/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kiln::TorchStateDict sd = kiln::parse_torch_pickle(data, size, "fuzz");
    for (const auto& t : sd.tensors)
      if (t.storage >= sd.storages.size() || t.shape.size() != t.stride.size()) __builtin_trap();
  } catch (const kiln::Error&) {
  }
  try {
    kiln::TorchBinLayout layout = kiln::plan_torch_bin(data, size, "fuzz");
    for (const auto& t : layout.mapped.tensors)
      if (t.begin > t.end || t.end > size) __builtin_trap();
    if (layout.copy_bytes > size) __builtin_trap();
    std::vector<uint8_t> copies(layout.copy_bytes);
    kiln::copy_views(data, layout, copies.data());
  } catch (const kiln::Error&) {
  }
  return 0;
}
