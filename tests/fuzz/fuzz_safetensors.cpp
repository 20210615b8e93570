// libFuzzer target: the safetensors header parser must reject any byte string with kiln::Error, never crash, read out
// of bounds or accept a header whose tensors do not fit the file.
#include <cstddef>
#include <cstdint>

#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kiln::SafetensorsHeader h = kiln::parse_safetensors_header(data, size, "fuzz");
    // Whatever is accepted must describe bytes inside the input.
    for (const auto& t : h.tensors)
      if (h.data_start + t.end > size || t.begin > t.end) __builtin_trap();
  } catch (const kiln::Error&) {
  }
  return 0;
}
