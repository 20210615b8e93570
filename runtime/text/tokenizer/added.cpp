#include "runtime/text/tokenizer/added.h"

#include <algorithm>

#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

void TokenTrie::add(std::string_view pattern, size_t index) {
  if (pattern.empty()) return;
  uint32_t node = 0;
  for (char ch : pattern) {
    auto b = static_cast<unsigned char>(ch);
    auto& next = nodes_[node].next;
    auto it = std::lower_bound(next.begin(), next.end(), std::make_pair(b, uint32_t{0}),
                               [](const auto& x, const auto& y) { return x.first < y.first; });
    if (it != next.end() && it->first == b) {
      node = it->second;
    } else {
      auto child = static_cast<uint32_t>(nodes_.size());
      next.insert(it, {b, child});
      nodes_.emplace_back();
      node = child;
    }
  }
  if (nodes_[node].value < 0) nodes_[node].value = static_cast<long>(index);  // first of duplicates wins
  first_[static_cast<unsigned char>(pattern[0])] = true;
}

long TokenTrie::match_at(std::string_view text, size_t pos, size_t& len) const {
  long best = -1;
  uint32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    auto b = static_cast<unsigned char>(text[i]);
    const auto& next = nodes_[node].next;
    auto it = std::lower_bound(next.begin(), next.end(), std::make_pair(b, uint32_t{0}),
                               [](const auto& x, const auto& y) { return x.first < y.first; });
    if (it == next.end() || it->first != b) break;
    node = it->second;
    if (nodes_[node].value >= 0) {
      best = nodes_[node].value;
      len = i + 1 - pos;
    }
  }
  return best;
}

void AddedVocabulary::build(std::vector<AddedToken> tokens, const Normalizer* normalizer) {
  tokens_ = std::move(tokens);
  for (size_t i = 0; i < tokens_.size(); ++i) {
    AddedToken& t = tokens_[i];
    t.display = t.content;
    by_id_.emplace(t.id, i);
    by_content_.emplace(t.content, i);
    if (t.normalized) {
      Piece p{t.content, t.content.empty() ? 0 : char_len(t.content[0]), -1};
      if (normalizer) normalizer->normalize(p);
      t.display = p.text;
      normalized_.add(p.text, normalized_map_.size());
      normalized_map_.push_back(i);
    } else {
      raw_.add(t.content, raw_map_.size());
      raw_map_.push_back(i);
    }
  }
}

const AddedToken* AddedVocabulary::find_by_id(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

const AddedToken* AddedVocabulary::find_by_content(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? nullptr : &tokens_[it->second];
}

namespace {

// Previous character before byte offset `end` (which is a character boundary).
char32_t char_before(std::string_view s, size_t end) {
  size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
  return next_char(s, b);
}

}  // namespace

void AddedVocabulary::split(Piece&& piece, const TokenTrie& trie, const std::vector<size_t>& map,
                            std::vector<Piece>& out) const {
  const std::string_view s = piece.text;
  auto emit = [&](size_t b, size_t e, int32_t id) {
    if (b >= e) return;
    Piece p;
    p.text.assign(s.substr(b, e - b));
    p.origin_len = b < piece.origin_len ? std::min(piece.origin_len - b, e - b) : 0;
    p.id = id;
    out.push_back(std::move(p));
  };
  if (trie.empty()) {
    if (!piece.text.empty()) out.push_back(std::move(piece));
    return;
  }
  size_t start_offset = 0;
  for (size_t pos = 0; pos < s.size();) {
    if (!trie.may_start(static_cast<unsigned char>(s[pos]))) {
      ++pos;
      continue;
    }
    size_t len = 0;
    long k = trie.match_at(s, pos, len);
    if (k < 0) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + len;
    pos = stop;  // matching resumes after the raw match, whatever the options below do with it
    const AddedToken& tok = tokens_[map[static_cast<size_t>(k)]];
    if (tok.single_word) {
      bool start_space = start == 0 || !is_word_char(char_before(s, start));
      size_t i = stop;
      bool stop_space = stop == s.size() || !is_word_char(next_char(s, i));
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      size_t b = start;
      while (b > 0) {
        size_t prev = b - 1;
        while (prev > 0 && (static_cast<unsigned char>(s[prev]) & 0xC0) == 0x80) --prev;
        size_t i = prev;
        if (!is_whitespace(next_char(s, i))) break;
        b = prev;
      }
      start = std::max(b, start_offset);
    }
    if (tok.rstrip) {
      for (size_t i = stop; i < s.size();) {
        if (!is_whitespace(next_char(s, i))) break;
        stop = i;
      }
    }
    start = std::max(start, start_offset);
    emit(start_offset, start, -1);
    emit(start, stop, tok.id);
    start_offset = stop;
  }
  emit(start_offset, s.size(), -1);
}

std::vector<Piece> AddedVocabulary::extract_and_normalize(std::string_view text, const Normalizer* normalizer) const {
  std::vector<Piece> first, out;
  Piece whole{std::string(text), text.empty() ? 0 : char_len(static_cast<unsigned char>(text[0])), -1};
  split(std::move(whole), raw_, raw_map_, first);
  out.reserve(first.size());
  for (auto& p : first) {
    if (p.id >= 0) {
      out.push_back(std::move(p));
      continue;
    }
    if (normalizer) normalizer->normalize(p);
    split(std::move(p), normalized_, normalized_map_, out);
  }
  return out;
}

}  // namespace kiln::text
