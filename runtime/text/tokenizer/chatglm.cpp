// ChatGLM2/3's tokenizer (tokenizer_class "ChatGLMTokenizer", remote code over a SentencePiece tokenizer.model): the
// SentencePiece model plus GLM's command tokens numbered right after its last piece, and a prompt prefix of
// [gMASK] sop instead of a BOS token. ChatGLM-6B's (v1, the same class over ice_text.model): the command tokens are
// pieces of the model, every id is shifted by num_image_tokens, whitespace is spelled as pieces, and [gMASK] <sop>
// close the prompt.
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

bool is_chatglm_v1_model(const std::filesystem::path& model_file) { return model_file.filename() == "ice_text.model"; }

std::vector<AddedToken> chatglm_v1_command_tokens(const SentencePieceModel& sp, int32_t id_offset) {
  // The tokens its tokenizer class names (end_token, mask_token, gmask_token, bos_token, eos_token), which
  // transformers splits text on; other pieces such as [sMASK] are SentencePiece's to match.
  std::vector<AddedToken> out;
  for (const char* content : {"</s>", "[MASK]", "[gMASK]", "<sop>", "<eop>"}) {
    const int32_t id = sp_piece_to_id(sp, content);
    if (id < 0) continue;
    AddedToken t;
    t.content = t.display = content;
    t.id = id + id_offset;
    t.special = true;
    out.push_back(t);
  }
  return out;
}

namespace {
constexpr int kMaxBlank = 80;  // SPTokenizer's max_blank_length

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  std::string out;
  size_t i = 0;
  for (size_t at; (at = s.find(from, i)) != std::string::npos; i = at + from.size()) out.append(s, i, at - i) += to;
  s = out + s.substr(i);
}
}  // namespace

std::string glm_v1_preprocess(std::string_view text) {
  // SPTokenizer._preprocess: newlines, then tabs, then runs of spaces longest first (a run of 85 becomes
  // <|blank_80|><|blank_5|>).
  std::string s(text);
  replace_all(s, "\n", "<n>");
  replace_all(s, "\t", "<|tab|>");
  for (int n = kMaxBlank; n >= 2; --n)
    replace_all(s, std::string(size_t(n), ' '), "<|blank_" + std::to_string(n) + "|>");
  return s;
}

std::string glm_v1_postprocess(std::string s) {
  // SPTokenizer.decode: <n>, then <|tab|>, then the blanks shortest first.
  replace_all(s, "<n>", "\n");
  replace_all(s, "<|tab|>", "\t");
  for (int n = 2; n <= kMaxBlank; ++n)
    replace_all(s, "<|blank_" + std::to_string(n) + "|>", std::string(size_t(n), ' '));
  return s;
}

}  // namespace kiln::text
