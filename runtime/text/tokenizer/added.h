#pragma once
// Added tokens (tokenizer.json "added_tokens"): matched in the raw text before normalization (normalized=false) or in
// the normalized text (normalized=true), with HF's leftmost-longest rule and its lstrip/rstrip/single_word options.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/text/tokenizer/normalizer.h"

namespace kiln::text {

struct AddedToken {
  std::string content;
  std::string display;  // what id_to_token/decode show: HF keeps normalized tokens in their normalized form
  int32_t id = -1;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// A set of patterns matched leftmost-longest, byte by byte, with a first-byte filter so that ordinary text is
// scanned at memchr-like speed.
class TokenTrie {
 public:
  void add(std::string_view pattern, size_t index);
  // Longest pattern starting exactly at text[pos]; returns its index and sets len, or returns -1.
  long match_at(std::string_view text, size_t pos, size_t& len) const;
  bool may_start(unsigned char b) const { return first_[b]; }
  bool empty() const { return nodes_.size() <= 1; }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, uint32_t>> next;  // sorted by byte
    long value = -1;
  };
  std::vector<Node> nodes_{Node{}};
  bool first_[256] = {};
};

class AddedVocabulary {
 public:
  // `normalizer` pre-normalizes normalized=true patterns. Ids must already be assigned (see assign_added_ids).
  void build(std::vector<AddedToken> tokens, const Normalizer* normalizer);

  // HF's extract_and_normalize: cut out raw-text added tokens, normalize the rest, then cut out normalized ones.
  std::vector<Piece> extract_and_normalize(std::string_view text, const Normalizer* normalizer) const;

  const std::vector<AddedToken>& tokens() const { return tokens_; }
  const AddedToken* find_by_id(int32_t id) const;
  const AddedToken* find_by_content(std::string_view content) const;

 private:
  void split(Piece&& piece, const TokenTrie& trie, const std::vector<size_t>& map, std::vector<Piece>& out) const;

  std::vector<AddedToken> tokens_;
  std::unordered_map<int32_t, size_t> by_id_;
  std::unordered_map<std::string, size_t> by_content_;
  TokenTrie raw_, normalized_;
  std::vector<size_t> raw_map_, normalized_map_;  // trie pattern index -> tokens_ index
};

// HF ignores the ids written in tokenizer.json's added_tokens and assigns them again in order: the model's id when the
// content is in the model vocabulary, otherwise the next free id past the model vocabulary (counted, not max id).
// Duplicated contents are dropped. `model_id` answers -1 for tokens outside the model vocabulary.
template <class ModelId>
void assign_added_ids(std::vector<AddedToken>& tokens, size_t model_vocab_count, ModelId model_id) {
  std::vector<AddedToken> out;
  int64_t max_id = -1;
  for (auto& t : tokens) {
    if (t.content.empty()) continue;
    bool dup = false;
    for (const auto& o : out) dup |= o.content == t.content;
    if (dup) continue;
    int32_t id = model_id(t.content);
    if (id < 0) {
      auto n = static_cast<int64_t>(model_vocab_count);
      id = static_cast<int32_t>(max_id < 0 ? n : (max_id >= n || n == 0 ? max_id + 1 : n));
    }
    t.id = id;
    max_id = std::max<int64_t>(max_id, id);
    out.push_back(std::move(t));
  }
  tokens.swap(out);
}

}  // namespace kiln::text
