#pragma once
// kiln's tokenizer: Hugging Face tokenizer.json (BPE model with its normalizers, pre-tokenizers, post-processors,
// decoders and added tokens) reimplemented for exact id parity, plus SentencePiece tokenizer.model files through
// libsentencepiece. See docs/tokenizer.md.
//
// Two parity targets exist because transformers 5 does not always run tokenizer.json as written:
//  - TokenizerCompat::Transformers (default) matches AutoTokenizer.from_pretrained(dir)(text)["input_ids"]: it reads
//    tokenizer_config.json (add_bos_token/add_eos_token, extra added tokens) and rebuilds the pipeline that
//    transformers hard-codes for LlamaTokenizer.
//  - TokenizerCompat::TokenizersLibrary matches tokenizers.Tokenizer.from_file("tokenizer.json").encode(text).ids.
//
// Invalid UTF-8 input is never an error: each ill-formed subsequence is replaced by U+FFFD (the "maximal subpart"
// rule), which is what Python sees after bytes.decode("utf-8", errors="replace"). decode() likewise returns valid
// UTF-8, with U+FFFD where tokens spell invalid bytes.
//
// A Tokenizer is immutable and cheap to copy; all methods are thread-safe.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/text/tokenizer/files.h"

namespace kiln {

namespace text {
struct TokenizerImpl;
}

enum class TokenizerCompat { Transformers, TokenizersLibrary };

class Tokenizer {
 public:
  // Throws kiln::Error naming the file and field when a file is malformed or uses an unsupported component.
  static Tokenizer load(const TokenizerFiles& files, TokenizerCompat compat = TokenizerCompat::Transformers);
  // A tokenizer.json document given as text, with an optional tokenizer_config.json object; `name` is used in errors.
  static Tokenizer from_json(std::string_view tokenizer_json, const nlohmann::json& tokenizer_config = nullptr,
                             TokenizerCompat compat = TokenizerCompat::Transformers,
                             const std::string& name = "tokenizer.json");

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Unknown ids are skipped, as in HF.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  std::optional<std::string> id_to_token(int32_t id) const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // One past the largest id of the model vocabulary and the added tokens (the embedding rows the ids address).
  size_t vocab_size() const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  bool is_special(int32_t id) const;

  const text::TokenizerImpl& impl() const { return *impl_; }

 private:
  explicit Tokenizer(std::shared_ptr<const text::TokenizerImpl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const text::TokenizerImpl> impl_;
};

}  // namespace kiln
