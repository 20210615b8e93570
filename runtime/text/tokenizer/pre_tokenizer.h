#pragma once
// Pre-tokenizers: the second layer of the HF pipeline (tokenizer.json "pre_tokenizer"). They cut pieces into smaller
// pieces (the "words" the model sees) and may rewrite them (ByteLevel, Metaspace). Added-token pieces (id >= 0) pass
// through untouched; empty pieces are dropped, as in HF.
#include <memory>
#include <vector>

#include "runtime/text/tokenizer/normalizer.h"

namespace kiln::text {

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Appends the pieces that `in` splits into to `out`.
  virtual void split(Piece&& in, std::vector<Piece>& out) const = 0;
  // Applies split() to every non-added piece.
  void pre_tokenize(std::vector<Piece>& pieces) const;
};

// Returns nullptr for JSON null.
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j, const JsonWhere& where);

// HF's SplitDelimiterBehavior.
enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// Cuts `p` around `matches` (sorted, non-overlapping spans) exactly as HF's NormalizedString::split does.
void split_around(Piece&& p, const std::vector<Span>& matches, bool invert, SplitBehavior behavior,
                  std::vector<Piece>& out);

// The GPT-2 pre-tokenization regex used by ByteLevel when use_regex is true.
const Regex& gpt2_regex();

}  // namespace kiln::text
