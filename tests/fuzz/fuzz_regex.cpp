// libFuzzer target: arbitrary Oniguruma patterns through kiln's translation to PCRE2, and the compiled ones over
// arbitrary text. A pattern may be refused (kiln::Error), but nothing may crash, and the matches must be in order,
// inside the text and on character boundaries: the pre-tokenizer cuts text at exactly these spans.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "runtime/core/error.h"
#include "runtime/text/tokenizer/regex.h"
#include "runtime/text/tokenizer/unicode.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t split = 1 + (size - 1) * data[0] / 256;
  std::string pattern = kiln::text::sanitize_utf8(std::string(reinterpret_cast<const char*>(data + 1), split - 1));
  std::string text = kiln::text::sanitize_utf8(std::string(reinterpret_cast<const char*>(data + split), size - split));
  try {
    kiln::text::Regex re(pattern);
    size_t last = 0;
    for (auto [b, e] : re.find_all(text)) {
      if (b < last || e < b || e > text.size()) std::abort();
      for (size_t at : {b, e})
        if (at < text.size() && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) std::abort();
      last = e;
    }
  } catch (const kiln::Error&) {
    // A pattern PCRE2 or the translation refuses: a clear error, which is what a bad tokenizer.json gets.
  }
  return 0;
}
