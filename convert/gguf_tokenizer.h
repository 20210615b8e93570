#pragma once
// A GGUF file carries its tokenizer as metadata (tokenizer.ggml.*), not as tokenizer.json. This rebuilds the
// tokenizer.json + tokenizer_config.json pair that kiln (and Hugging Face) load, plus the chat template:
//   - model "gpt2": byte-level BPE with the file's merges; the pre-tokenizer follows tokenizer.ggml.pre (the regex
//     llama.cpp uses for that name; unknown names are refused);
//   - model "llama": SentencePiece-style BPE with byte fallback, merges recovered from the scores;
//   - token types: control tokens become special added tokens, user-defined ones plain added tokens;
//   - BOS/EOS/UNK/PAD by id, add_bos_token / add_eos_token, and tokenizer.chat_template.
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "convert/gguf_file.h"

namespace kiln::gguf {

struct RebuiltTokenizer {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
  std::optional<std::string> chat_template;
};

// Throws naming the file and the metadata key on anything missing, malformed or unsupported.
RebuiltTokenizer rebuild_tokenizer(const Model& model);

// The pre-tokenizer names (tokenizer.ggml.pre) kiln knows, for error messages and docs.
std::string supported_pre_tokenizers();

// The tokenizer.ggml.pre name whose split is exactly this tokenizer.json pre_tokenizer, or "" when none is.
std::string pre_tokenizer_name(const nlohmann::json& pre_tokenizer);

}  // namespace kiln::gguf
