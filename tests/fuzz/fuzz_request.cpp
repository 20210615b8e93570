// libFuzzer target: the server's request path without the network. Any body, for either route, must parse into a
// request (prompt rendered through the real qwen3 chat template and tokenized) or be refused with an ApiError in
// the 4xx range; nothing else may escape, and nothing may crash or recurse off the stack.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "runtime/serve/http_api.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"

#ifndef KILN_TESTDATA_DIR
#define KILN_TESTDATA_DIR "build/testdata"
#endif

namespace {

std::string qwen_dir() {
  const char* env = std::getenv("KILN_TESTDATA_DIR");
  return std::string(env ? env : KILN_TESTDATA_DIR) + "/tokenizers/qwen3";
}

struct Setup {
  kiln::Tokenizer tok = kiln::Tokenizer::load(kiln::locate_tokenizer_files(qwen_dir()));
  kiln::ChatTemplate tpl = kiln::ChatTemplate::from_files(kiln::locate_tokenizer_files(qwen_dir()));
  kiln::serve::PromptBound bound{256, kiln::serve::longest_token_bytes(tok)};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Setup s;
  if (size == 0) return 0;
  const bool chat = data[0] & 1;
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    kiln::serve::ApiRequest r = kiln::serve::parse_request(body, chat, s.tok, &s.tpl, s.bound);
    if (r.n < 1 || r.prompt.empty() == chat) {
      // A chat prompt is never empty (the template adds its markers); a completion's may be ("prompt": "").
      if (chat || r.n < 1) std::abort();
    }
    for (int32_t id : r.prompt)
      if (id < 0 || size_t(id) >= s.tok.vocab_size()) std::abort();
  } catch (const kiln::serve::ApiError& e) {
    if (e.status < 400 || e.status >= 500) std::abort();
    if (std::string(e.what()).empty()) std::abort();
  }
  return 0;
}
