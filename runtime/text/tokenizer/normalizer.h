#pragma once
// Normalizers: the first layer of the HF pipeline (tokenizer.json "normalizer"). They rewrite one piece of text in
// place.
#include <memory>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/json.h"
#include "runtime/text/tokenizer/regex.h"

namespace kiln::text {

// A piece of text flowing through normalizers and pre-tokenizers. HF tracks a full alignment to the original input;
// the only behaviour that depends on it (Metaspace's prepend_scheme "first") needs to know whether a piece starts at
// offset 0 of the input, so we keep just that: `origin_len` leading bytes of `text` are aligned to input offset 0.
// A piece cut at byte k starts at the input's origin exactly when k < origin_len.
struct Piece {
  std::string text;
  size_t origin_len = 0;
  int32_t id = -1;  // set when the piece is an added token, which later layers leave alone
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(Piece& p) const = 0;
};

// Builds a normalizer from its tokenizer.json object; returns nullptr for JSON null.
std::unique_ptr<Normalizer> make_normalizer(const json& j, const JsonWhere& where);

// {"String": "..."} or {"Regex": "..."}.
Pattern make_pattern(const json& j, const JsonWhere& where);

// Replaces every match of `pattern` with `content`, keeping `origin_len` consistent. Shared with Metaspace.
void replace_all(Piece& p, const Pattern& pattern, const std::string& content);

}  // namespace kiln::text
