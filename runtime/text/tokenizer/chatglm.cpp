// ChatGLM2/3's tokenizer (tokenizer_class "ChatGLMTokenizer", remote code over a SentencePiece tokenizer.model): the
// SentencePiece model plus GLM's command tokens numbered right after its last piece, and a prompt prefix of
// [gMASK] sop instead of a BOS token.
#include "runtime/text/tokenizer/impl.h"

namespace kiln::text {

namespace {
// In id order from the SentencePiece vocabulary size on: ChatGLM2's five command tokens, then ChatGLM3's four role
// tokens. ChatGLM2's code stops after "eop"; its checkpoints never produce the role ids (untrained embedding rows).
const char* const kChatGlmTokens[] = {"[MASK]",   "[gMASK]",       "[sMASK]",        "sop", "eop", "<|system|>",
                                      "<|user|>", "<|assistant|>", "<|observation|>"};
}  // namespace

bool is_chatglm_tokenizer(const json& tokenizer_config) {
  auto it = tokenizer_config.find("tokenizer_class");
  return it != tokenizer_config.end() && it->is_string() && *it == "ChatGLMTokenizer";
}

bool is_glm4_tokenizer(const json& tokenizer_config) {
  auto it = tokenizer_config.find("tokenizer_class");
  return it != tokenizer_config.end() && it->is_string() && *it == "ChatGLM4Tokenizer";
}

std::vector<AddedToken> chatglm_command_tokens(size_t sp_vocab_size) {
  std::vector<AddedToken> out;
  int32_t id = static_cast<int32_t>(sp_vocab_size);
  for (const char* content : kChatGlmTokens) {
    AddedToken t;
    t.content = t.display = content;
    t.id = id++;
    t.special = true;
    out.push_back(t);
  }
  return out;
}

}  // namespace kiln::text
