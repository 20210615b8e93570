#include "convert/gguf_tokenizer.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "runtime/core/error.h"

namespace kiln::gguf {

using nlohmann::ordered_json;

namespace {

// llama.cpp's token types (tokenizer.ggml.token_type).
enum TokenType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// The split regexes llama.cpp applies for a tokenizer.ggml.pre name, as Hugging Face pre-tokenizers. Each entry lists
// the names llama.cpp treats alike.
const char* kLlama3Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* kQwen2Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

ordered_json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

ordered_json split_then_bytes(const char* regex) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
            byte_level(false)}}};
}

struct PreTokenizerEntry {
  std::vector<const char*> names;
  ordered_json (*make)();
};

const std::vector<PreTokenizerEntry>& pre_tokenizer_table() {
  static const std::vector<PreTokenizerEntry> table = {
      // GPT-2's own regex, applied by ByteLevel.
      {{"gpt-2", "gpt2", "phi-2"}, [] { return byte_level(true); }},
      // SmolLM: every digit on its own, then GPT-2's regex.
      {{"smollm"},
       [] {
         return ordered_json{{"type", "Sequence"},
                             {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)}}};
       }},
      {{"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"}, [] { return split_then_bytes(kLlama3Split); }},
      {{"qwen2", "deepseek-r1-qwen"}, [] { return split_then_bytes(kQwen2Split); }},
  };
  return table;
}

struct Reader {
  const Model& m;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(m.label() + ": metadata '" + key + "' " + what);
  }
  const Value* get(const std::string& key) const { return m.find(key); }
  const Value& array(const std::string& key, ValueType element) const {
    const Value* v = get(key);
    if (!v) fail(key, "is missing; kiln needs it to rebuild the tokenizer");
    if (v->type != ValueType::ARRAY || v->element_type != element)
      fail(key, std::string("must be an array of ") + value_type_name(element));
    return *v;
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    const Value* v = get(key);
    if (!v) return fallback;
    if (v->type != ValueType::STRING) fail(key, "must be a string");
    return v->s;
  }
  bool flag(const std::string& key, bool fallback) const {
    const Value* v = get(key);
    if (!v) return fallback;
    if (v->type != ValueType::BOOL) fail(key, "must be a bool");
    return v->u != 0;
  }
  std::optional<int64_t> token_id(const std::string& key, size_t vocab) const {
    const Value* v = get(key);
    if (!v) return std::nullopt;
    auto id = v->as_int();
    if (!id) fail(key, "must be an integer");
    if (*id < 0 || uint64_t(*id) >= vocab)
      fail(key, "is " + std::to_string(*id) + ", outside the " + std::to_string(vocab) + "-token vocabulary");
    return id;
  }
};

// Splits a UTF-8 string into code points (as byte offsets of their starts).
std::vector<size_t> code_point_starts(const std::string& s) {
  std::vector<size_t> out;
  for (size_t k = 0; k < s.size(); ++k)
    if ((uint8_t(s[k]) & 0xC0) != 0x80) out.push_back(k);
  return out;
}

// SentencePiece BPE merges from the scores: every split of a token into two vocabulary tokens, best score of the
// merged token first (then longer left, longer right), as Hugging Face recovers them for a vocabulary without merges.
std::vector<std::string> merges_from_scores(const std::vector<std::string>& tokens, const std::vector<float>& scores) {
  std::unordered_map<std::string, int64_t> id;
  for (size_t k = 0; k < tokens.size(); ++k) id[tokens[k]] = int64_t(k);  // a repeated token keeps its last id
  struct Merge {
    float score;
    size_t left_len, right_len;  // in code points
    int64_t left_id, right_id;
    std::string text;
  };
  std::vector<Merge> merges;
  std::unordered_set<std::string> seen;
  for (const std::string& t : tokens) {
    if (!seen.insert(t).second) continue;  // each distinct token once, in order of first appearance
    const float score = scores[size_t(id[t])];
    std::vector<size_t> starts = code_point_starts(t);
    std::vector<Merge> local;
    for (size_t c = 1; c < starts.size(); ++c) {
      std::string l = t.substr(0, starts[c]), r = t.substr(starts[c]);
      auto il = id.find(l), ir = id.find(r);
      if (il != id.end() && ir != id.end())
        local.push_back({score, c, starts.size() - c, il->second, ir->second, l + " " + r});
    }
    std::stable_sort(local.begin(), local.end(), [](const Merge& a, const Merge& b) {
      return a.left_id != b.left_id ? a.left_id < b.left_id : a.right_id < b.right_id;
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.left_len != b.left_len) return a.left_len > b.left_len;
    return a.right_len > b.right_len;
  });
  std::vector<std::string> out;
  out.reserve(merges.size());
  for (auto& m : merges) out.push_back(std::move(m.text));
  return out;
}

}  // namespace

std::string supported_pre_tokenizers() {
  std::string s;
  for (const auto& e : pre_tokenizer_table())
    for (const char* n : e.names) s += (s.empty() ? "" : ", ") + std::string(n);
  return s;
}

std::string pre_tokenizer_name(const nlohmann::json& pre_tokenizer) {
  for (const auto& e : pre_tokenizer_table())
    if (nlohmann::json::parse(e.make().dump()) == pre_tokenizer) return e.names.front();
  return "";
}

RebuiltTokenizer rebuild_tokenizer(const Model& model) {
  Reader r{model};
  const std::string type = r.string("tokenizer.ggml.model", "");
  if (type.empty()) r.fail("tokenizer.ggml.model", "is missing; the file carries no tokenizer");
  if (type != "gpt2" && type != "llama")
    r.fail("tokenizer.ggml.model", "is '" + type +
                                       "'; kiln rebuilds 'gpt2' (byte-level BPE) and 'llama' "
                                       "(SentencePiece BPE) tokenizers");
  const Value& token_values = r.array("tokenizer.ggml.tokens", ValueType::STRING);
  std::vector<std::string> tokens;
  tokens.reserve(token_values.items.size());
  for (const Value& v : token_values.items) tokens.push_back(v.s);
  if (tokens.empty()) r.fail("tokenizer.ggml.tokens", "is empty");
  std::vector<int64_t> types(tokens.size(), kNormal);
  if (r.get("tokenizer.ggml.token_type")) {
    const Value& tv = r.array("tokenizer.ggml.token_type", ValueType::I32);
    if (tv.items.size() != tokens.size())
      r.fail("tokenizer.ggml.token_type",
             "has " + std::to_string(tv.items.size()) + " entries for " + std::to_string(tokens.size()) + " tokens");
    for (size_t k = 0; k < tokens.size(); ++k) types[k] = tv.items[k].i;
  }

  ordered_json vocab = ordered_json::object();
  for (size_t k = 0; k < tokens.size(); ++k) vocab[tokens[k]] = k;
  ordered_json model_json = {{"type", "BPE"}, {"dropout", nullptr}};
  ordered_json tok = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}};
  ordered_json config = ordered_json::object();
  const auto unk = r.token_id("tokenizer.ggml.unknown_token_id", tokens.size());

  if (type == "gpt2") {
    const Value& merge_values = r.array("tokenizer.ggml.merges", ValueType::STRING);
    std::vector<std::string> merges;
    for (const Value& v : merge_values.items) merges.push_back(v.s);
    const std::string pre = r.string("tokenizer.ggml.pre", "gpt-2");
    const PreTokenizerEntry* entry = nullptr;
    for (const auto& e : pre_tokenizer_table())
      for (const char* n : e.names)
        if (pre == n) entry = &e;
    if (!entry)
      r.fail("tokenizer.ggml.pre",
             "is '" + pre + "', a pre-tokenizer kiln does not know (known: " + supported_pre_tokenizers() + ")");
    model_json.update({{"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false},
                       {"byte_fallback", false},
                       {"ignore_merges", false},
                       {"vocab", vocab},
                       {"merges", merges}});
    tok["normalizer"] = nullptr;
    tok["pre_tokenizer"] = entry->make();
    tok["post_processor"] = nullptr;
    tok["decoder"] = byte_level(true);
    config["tokenizer_class"] = "GPT2Tokenizer";
    config["add_bos_token"] = r.flag("tokenizer.ggml.add_bos_token", false);
  } else {
    const Value& score_values = r.array("tokenizer.ggml.scores", ValueType::F32);
    if (score_values.items.size() != tokens.size())
      r.fail("tokenizer.ggml.scores", "has " + std::to_string(score_values.items.size()) + " entries for " +
                                          std::to_string(tokens.size()) + " tokens");
    std::vector<float> scores;
    for (const Value& v : score_values.items) scores.push_back(float(v.f));
    const bool add_space_prefix = r.flag("tokenizer.ggml.add_space_prefix", true);
    model_json.update({{"unk_token", unk ? ordered_json(tokens[size_t(*unk)]) : ordered_json(nullptr)},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", true},
                       {"byte_fallback", true},
                       {"ignore_merges", false},
                       {"vocab", vocab},
                       {"merges", merges_from_scores(tokens, scores)}});
    const std::string scheme = add_space_prefix ? "first" : "never";
    tok["normalizer"] = nullptr;
    tok["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", scheme}, {"split", false}};
    tok["post_processor"] = nullptr;
    ordered_json steps = {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
                          {{"type", "ByteFallback"}},
                          {{"type", "Fuse"}}};
    if (add_space_prefix) steps.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
    tok["decoder"] = {{"type", "Sequence"}, {"decoders", steps}};
    config["tokenizer_class"] = "LlamaTokenizerFast";
    config["add_prefix_space"] = add_space_prefix;
    config["legacy"] = false;
    config["add_bos_token"] = r.flag("tokenizer.ggml.add_bos_token", true);  // llama.cpp's SentencePiece default
  }
  config["add_eos_token"] = r.flag("tokenizer.ggml.add_eos_token", false);

  // Control tokens are matched whole and are special; user-defined ones are matched whole but are ordinary text.
  ordered_json added = ordered_json::array();
  for (size_t k = 0; k < tokens.size(); ++k) {
    if (types[k] != kControl && types[k] != kUserDefined) continue;
    if (tokens[k].empty()) continue;
    added.push_back({{"id", k},
                     {"content", tokens[k]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", types[k] == kControl}});
  }
  tok["added_tokens"] = added;
  tok["model"] = model_json;

  for (auto [key, name] :
       {std::pair{"tokenizer.ggml.bos_token_id", "bos_token"}, std::pair{"tokenizer.ggml.eos_token_id", "eos_token"},
        std::pair{"tokenizer.ggml.unknown_token_id", "unk_token"},
        std::pair{"tokenizer.ggml.padding_token_id", "pad_token"}})
    if (auto id = r.token_id(key, tokens.size())) config[name] = tokens[size_t(*id)];
  config["clean_up_tokenization_spaces"] = false;

  RebuiltTokenizer out;
  // The key order of tokenizer.json follows Hugging Face's; "model" last keeps the large vocabulary at the end.
  ordered_json ordered = {
      {"version", tok["version"]},           {"truncation", nullptr},           {"padding", nullptr},
      {"added_tokens", tok["added_tokens"]}, {"normalizer", tok["normalizer"]}, {"pre_tokenizer", tok["pre_tokenizer"]},
      {"post_processor", nullptr},           {"decoder", tok["decoder"]},       {"model", tok["model"]}};
  out.tokenizer_json = ordered.dump(2) + "\n";
  out.tokenizer_config_json = config.dump(2) + "\n";
  if (const Value* t = r.get("tokenizer.chat_template")) {
    if (t->type != ValueType::STRING) r.fail("tokenizer.chat_template", "must be a string");
    out.chat_template = t->s;
  }
  return out;
}

}  // namespace kiln::gguf
