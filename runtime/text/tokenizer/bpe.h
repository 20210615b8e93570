#pragma once
// The BPE model of HF `tokenizers` (tokenizer.json "model" with type "BPE"): vocabulary, ranked merges, byte fallback,
// unknown-token fusing, ignore_merges and the continuing-subword prefix / end-of-word suffix. Merging follows the
// reference algorithm step by step (a min-heap on (rank, position) with the same stale-entry rule), so ids match
// exactly. Results are cached per word.
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "runtime/text/tokenizer/json.h"

namespace kiln::text {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// Open-addressing map from a (left id, right id) pair to (rank, merged id); hot in every merge step.
class MergeMap {
 public:
  struct Value {
    uint32_t rank;
    int32_t id;
  };
  void reserve(size_t n);
  void insert(int32_t a, int32_t b, Value v);  // a later insert of the same pair wins, as in HF
  const Value* find(int32_t a, int32_t b) const;
  size_t size() const { return count_; }

 private:
  struct Slot {
    uint64_t key = kEmpty;
    Value value{};
  };
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  size_t slot_of(uint64_t k) const;
  std::vector<Slot> slots_;
  size_t mask_ = 0, count_ = 0;
};

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object. Throws kiln::Error naming the field on malformed input.
  BpeModel(const json& model, const JsonWhere& where);
  // A tiktoken vocabulary: tokens[i] (spelled byte-level, as the ByteLevel pre-tokenizer writes words) has id and
  // rank i. tiktoken merges the adjacent pair whose concatenation has the lowest rank, leftmost first, and takes a
  // word that is itself a token whole: so every split of a token into two tokens is a merge ranked by that token, and
  // ignore_merges is on. Every single byte must be a token (the caller checks).
  explicit BpeModel(const std::vector<std::string>& tiktoken_tokens);

  // Appends the ids of one pre-tokenized word.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  int32_t token_to_id(std::string_view token) const;  // -1 when absent
  const std::string* id_to_token(int32_t id) const;   // nullptr when absent
  // One past the largest id in the vocabulary.
  size_t id_limit() const { return id_to_token_.size(); }
  const Vocab& vocab() const { return vocab_; }

 private:
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  Vocab vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  MergeMap merges_;
  std::optional<std::string> unk_token_;
  int32_t unk_id_ = -1;
  std::string prefix_, suffix_;  // continuing_subword_prefix, end_of_word_suffix
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  int32_t byte_ids_[256];   // "<0xAB>" tokens for byte fallback, -1 when absent
  int32_t ascii_ids_[128];  // single ASCII characters, for the common case without prefix/suffix

  // Word cache: HF caches words shorter than 256 bytes; so do we, with a bounded size.
  static constexpr size_t kCacheMaxWord = 256, kCacheCapacity = 1 << 17;
  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace kiln::text
