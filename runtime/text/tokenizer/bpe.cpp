#include "runtime/text/tokenizer/bpe.h"

#include <algorithm>
#include <cstdio>
#include <mutex>

#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

void MergeMap::reserve(size_t n) {
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  count_ = 0;
}

size_t MergeMap::slot_of(uint64_t k) const {
  uint64_t h = k * 0x9E3779B97F4A7C15ull;
  size_t i = static_cast<size_t>(h >> 20) & mask_;
  while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask_;
  return i;
}

void MergeMap::insert(int32_t a, int32_t b, Value v) {
  if ((count_ + 1) * 2 > slots_.size()) {
    std::vector<Slot> old = std::move(slots_);
    reserve(std::max<size_t>(count_ + 1, old.size()));
    for (const auto& s : old)
      if (s.key != kEmpty) {
        size_t i = slot_of(s.key);
        slots_[i] = s;
        ++count_;
      }
  }
  size_t i = slot_of(key(a, b));
  if (slots_[i].key == kEmpty) ++count_;
  slots_[i].key = key(a, b);
  slots_[i].value = v;
}

const MergeMap::Value* MergeMap::find(int32_t a, int32_t b) const {
  if (slots_.empty()) return nullptr;
  const Slot& s = slots_[slot_of(key(a, b))];
  return s.key == kEmpty ? nullptr : &s.value;
}

BpeModel::BpeModel(const json& m, const JsonWhere& w) {
  auto dropout = m.find("dropout");
  if (dropout != m.end() && !dropout->is_null() && !(dropout->is_number() && dropout->get<double>() == 0.0))
    (w / "dropout").fail("is set, but BPE dropout is random and kiln only supports deterministic encoding (null)");

  const json& vocab = require(m, "vocab", w);
  if (!vocab.is_object()) (w / "vocab").fail("must be an object mapping tokens to ids");
  vocab_.reserve(vocab.size());
  int32_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      (w / "vocab").fail("maps '" + it.key() + "' to something that is not a non-negative integer id");
    auto id = static_cast<int32_t>(it.value().get<int64_t>());
    vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  id_to_token_.resize(static_cast<size_t>(max_id + 1));
  has_id_.assign(id_to_token_.size(), false);
  for (const auto& [tok, id] : vocab_) {
    id_to_token_[id] = tok;
    has_id_[id] = true;
  }

  prefix_ = opt_string(m, "continuing_subword_prefix", "", w);
  suffix_ = opt_string(m, "end_of_word_suffix", "", w);
  fuse_unk_ = opt_bool(m, "fuse_unk", false, w);
  byte_fallback_ = opt_bool(m, "byte_fallback", false, w);
  ignore_merges_ = opt_bool(m, "ignore_merges", false, w);
  if (m.contains("unk_token") && !m["unk_token"].is_null()) {
    unk_token_ = opt_string(m, "unk_token", "", w);
    unk_id_ = token_to_id(*unk_token_);
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    byte_ids_[b] = token_to_id(name);
  }
  for (int c = 0; c < 128; ++c) ascii_ids_[c] = token_to_id(std::string(1, static_cast<char>(c)));

  const json& merges = require(m, "merges", w);
  if (!merges.is_array()) (w / "merges").fail("must be a list");
  merges_.reserve(merges.size());
  uint32_t rank = 0;
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& e = merges[i];
    std::string a, b;
    if (e.is_string()) {
      const std::string& line = e.get_ref<const std::string&>();
      if (line.rfind("#version", 0) == 0) continue;  // header line of old merges.txt files
      size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
        (w / "merges")[i].fail("must be two tokens separated by one space");
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      (w / "merges")[i].fail("must be \"a b\" or [\"a\", \"b\"]");
    }
    int32_t ia = token_to_id(a), ib = token_to_id(b);
    if (ia < 0 || ib < 0) (w / "merges")[i].fail("uses '" + (ia < 0 ? a : b) + "', which is not in the vocabulary");
    std::string merged = a + (b.size() >= prefix_.size() ? b.substr(prefix_.size()) : std::string());
    int32_t im = token_to_id(merged);
    if (im < 0) (w / "merges")[i].fail("produces '" + merged + "', which is not in the vocabulary");
    merges_.insert(ia, ib, {rank++, im});
  }
}

BpeModel::BpeModel(const std::vector<std::string>& tokens) {
  vocab_.reserve(tokens.size());
  id_to_token_ = tokens;
  has_id_.assign(tokens.size(), true);
  for (size_t i = 0; i < tokens.size(); ++i) vocab_.emplace(tokens[i], int32_t(i));
  ignore_merges_ = true;
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  for (int c = 0; c < 128; ++c) ascii_ids_[c] = token_to_id(std::string(1, static_cast<char>(c)));
  merges_.reserve(tokens.size() * 2);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& t = tokens[i];
    for (size_t cut = char_len(static_cast<unsigned char>(t[0])); cut < t.size();
         cut += char_len(static_cast<unsigned char>(t[cut]))) {
      const int32_t a = token_to_id(std::string_view(t).substr(0, cut)),
                    b = token_to_id(std::string_view(t).substr(cut));
      if (a >= 0 && b >= 0) merges_.insert(a, b, {uint32_t(i), int32_t(i)});
    }
  }
}

int32_t BpeModel::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    int32_t id = token_to_id(word);
    if (id >= 0) return out.push_back(id);
  }
  bool cacheable = word.size() < kCacheMaxWord;
  if (cacheable) {
    std::shared_lock lock(cache_mutex_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = out.size();
  merge_word(word, out);
  if (cacheable) {
    std::unique_lock lock(cache_mutex_);
    if (cache_.size() < kCacheCapacity)
      cache_.emplace(std::string(word), std::vector<int32_t>(out.begin() + first, out.end()));
  }
}

namespace {
struct Symbol {
  int32_t id;
  int32_t prev, next;
  uint32_t len;  // bytes; 0 marks a symbol merged into its left neighbour
};
struct Candidate {
  uint32_t rank;
  uint32_t pos;
  int32_t id;
};
// std::priority_queue keeps the "largest" on top; we want the lowest rank, then the leftmost position.
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};
}  // namespace

void BpeModel::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  thread_local std::vector<Symbol> symbols;
  thread_local std::string scratch;
  symbols.clear();
  auto add = [&](int32_t id, size_t len) {
    auto n = static_cast<int32_t>(symbols.size());
    if (n) symbols.back().next = n;
    symbols.push_back({id, n - 1, -1, static_cast<uint32_t>(len)});
  };
  bool plain = prefix_.empty() && suffix_.empty();
  int32_t unk = -1;  // pending unknown symbol, fused or flushed as HF does
  size_t unk_len = 0;
  for (size_t i = 0; i < w.size();) {
    size_t end = i + std::min(char_len(static_cast<unsigned char>(w[i])), w.size() - i);
    size_t byte_len = end - i;
    std::string_view s = w.substr(i, byte_len);
    if (!plain) {
      scratch.clear();
      if (i != 0) scratch += prefix_;
      scratch += s;
      if (end == w.size()) scratch += suffix_;
      s = scratch;
    }
    auto lead = static_cast<unsigned char>(w[i]);
    int32_t id = (plain && lead < 0x80) ? ascii_ids_[lead] : token_to_id(s);
    i = end;
    if (id >= 0) {
      if (unk >= 0) add(unk, unk_len), unk = -1;
      add(id, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char ch : s) all &= byte_ids_[static_cast<unsigned char>(ch)] >= 0;
      if (all) {
        for (char ch : s) add(byte_ids_[static_cast<unsigned char>(ch)], 1);
        continue;
      }
    }
    if (!unk_token_) continue;  // no unknown token: HF silently drops the character
    if (unk_id_ < 0) throw Error("tokenizer.json: model.unk_token '" + *unk_token_ + "' is not in the vocabulary");
    if (unk >= 0 && fuse_unk_) {
      unk_len += byte_len;
    } else {
      if (unk >= 0) add(unk, unk_len);
      unk = unk_id_;
      unk_len = byte_len;
    }
  }
  if (unk >= 0) add(unk, unk_len);

  thread_local std::vector<Candidate> queue;  // a binary heap kept across calls to reuse its capacity
  queue.clear();
  auto push = [&](Candidate c) {
    queue.push_back(c);
    std::push_heap(queue.begin(), queue.end(), CandidateAfter{});
  };
  for (size_t k = 0; k + 1 < symbols.size(); ++k)
    if (const auto* m = merges_.find(symbols[k].id, symbols[k + 1].id))
      queue.push_back({m->rank, static_cast<uint32_t>(k), m->id});
  std::make_heap(queue.begin(), queue.end(), CandidateAfter{});
  while (!queue.empty()) {
    std::pop_heap(queue.begin(), queue.end(), CandidateAfter{});
    Candidate top = queue.back();
    queue.pop_back();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    Symbol right = symbols[cur.next];
    // Skip stale entries: HF compares only the merged id, so we do too.
    const auto* now = merges_.find(cur.id, right.id);
    if (!now || now->id != top.id) continue;
    cur.id = top.id;
    cur.len += right.len;
    symbols[cur.next].len = 0;
    cur.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = static_cast<int32_t>(top.pos);
    if (cur.prev >= 0)
      if (const auto* m = merges_.find(symbols[cur.prev].id, cur.id))
        push({m->rank, static_cast<uint32_t>(cur.prev), m->id});
    if (cur.next >= 0)
      if (const auto* m = merges_.find(cur.id, symbols[cur.next].id)) push({m->rank, top.pos, m->id});
  }
  for (const auto& s : symbols)
    if (s.len) out.push_back(s.id);
}

}  // namespace kiln::text
