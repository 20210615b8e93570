#pragma once
// Added tokens (tokenizer.json "added_tokens"): matched in the raw text before normalization (normalized=false) or in
// the normalized text (normalized=true), with HF's leftmost-longest rule and its lstrip/rstrip/single_word options.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/text/normalizer.h"

namespace kiln::text {

struct AddedToken {
  std::string content;
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
  // Tokens are matched in the order HF builds its matchers; `normalizer` pre-normalizes normalized=true patterns.
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

}  // namespace kiln::text
