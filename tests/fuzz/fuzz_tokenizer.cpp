// libFuzzer target: arbitrary bytes through three real tokenizers (Llama 2, Qwen3, DeepSeek-V3). Encoding must never
// crash, decode must return valid UTF-8, and the streaming detokenizer must agree with decode. The first byte picks the
// tokenizer and options.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "runtime/text/tokenizer/detokenizer.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/text/tokenizer/unicode.h"

#ifndef KILN_TESTDATA_DIR
#define KILN_TESTDATA_DIR "build/testdata"
#endif

namespace {

// The unpacked test tokenizers: $KILN_TESTDATA_DIR (the build directory's testdata/) or ./build/testdata.
std::string testdata() {
  const char* env = std::getenv("KILN_TESTDATA_DIR");
  return env ? env : KILN_TESTDATA_DIR;
}

const kiln::Tokenizer& tokenizer(int which) {
  static const kiln::Tokenizer llama =
      kiln::Tokenizer::load(kiln::locate_tokenizer_files(testdata() + "/tokenizers/llama2"));
  static const kiln::Tokenizer qwen =
      kiln::Tokenizer::load(kiln::locate_tokenizer_files(testdata() + "/tokenizers/qwen3"));
  // A Sequence of Split regexes (literal CJK ranges, \p{N}{1,3}): its pre-tokenizer invariant throws if a cut would
  // lose bytes, which would end the run here.
  static const kiln::Tokenizer deepseek =
      kiln::Tokenizer::load(kiln::locate_tokenizer_files(testdata() + "/tokenizers/deepseek_v3"));
  return which == 2 ? deepseek : which ? qwen : llama;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const kiln::Tokenizer& tok = tokenizer(data[0] & 8 ? 2 : data[0] & 1);
  bool special = data[0] & 2;
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  auto ids = tok.encode(text, special);
  std::string decoded = tok.decode(ids, data[0] & 4);
  if (!kiln::text::is_valid_utf8(decoded)) std::abort();
  kiln::IncrementalDetokenizer detok(tok, data[0] & 4);
  std::string streamed;
  for (int32_t id : ids) streamed += detok.push(id);
  streamed += detok.finish();
  if (streamed != decoded) std::abort();
  // Raw ids (possibly out of range) must decode safely too.
  std::vector<int32_t> raw;
  for (size_t i = 1; i + 4 <= size; i += 4)
    raw.push_back(static_cast<int32_t>(data[i] | data[i + 1] << 8 | data[i + 2] << 16 | uint32_t(data[i + 3]) << 24) %
                  200000);
  if (!kiln::text::is_valid_utf8(tok.decode(raw))) std::abort();
  return 0;
}
