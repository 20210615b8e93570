// libFuzzer target: the GGUF header parser must reject any byte string with kiln::Error, never crash, read out of
// bounds, allocate without bound or accept tensors that do not fit the file.
#include <cstddef>
#include <cstdint>

#include "convert/gguf_file.h"
#include "runtime/core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kiln::gguf::Header h = kiln::gguf::parse_header(data, size, "fuzz");
    for (const auto& t : h.tensors)
      if (h.data_start + t.offset + t.nbytes > size || !t.type) __builtin_trap();
  } catch (const kiln::Error&) {
  }
  return 0;
}
