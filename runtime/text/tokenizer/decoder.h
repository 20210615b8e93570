#pragma once
// Decoders: turn token strings back into text (tokenizer.json "decoder"). Each one rewrites the list of token strings,
// as HF's decode_chain does; the final text is their concatenation.
#include <memory>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/json.h"

namespace kiln::text {

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

// Returns nullptr for JSON null (HF then joins tokens with spaces).
std::unique_ptr<Decoder> make_decoder(const json& j, const JsonWhere& where);

// Builders for pipelines that transformers assembles in code rather than reading from tokenizer.json.
std::unique_ptr<Decoder> make_llama_decoder(bool strip_leading_space);

}  // namespace kiln::text
