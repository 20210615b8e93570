// The tiktoken tokenizers: a vocabulary file of one "base64(token bytes) rank" line per token, with a family's special
// tokens (numbered after the vocabulary) and pre-tokenizer regex.
//  - Qwen v1 (qwen.tiktoken, tokenization_qwen.py): the text is NFC-normalized, special tokens are recognised anywhere
//    in it, the rest is split by the regex and each piece byte-pair merged by rank.
//  - GLM-4 (tokenizer.model, tokenization_chatglm.py's ChatGLM4Tokenizer): no normalization, digits in runs of up to
//    three, its special tokens recognised as added tokens, and every encoded text prefixed with [gMASK] <sop>.
// kiln runs both through its own pipeline: the normalizer, the regex as a Split, ByteLevel spelling, and a
// rank-ordered BPE (BpeModel's tiktoken constructor).
#include <fstream>
#include <sstream>

#include "runtime/io/path_safety.h"
#include "runtime/text/tokenizer/impl.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

namespace {

// Qwen's PAT_STR (tokenization_qwen.py). tiktoken runs it with Rust's fancy-regex; for this pattern that agrees with
// Oniguruma's reading, which kiln's Split translates (docs/tokenizer.md).
constexpr const char* kQwenPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr int kQwenExtraTokens = 205;  // <|extra_0|> ... <|extra_204|>

// GLM-4's pat_str (tokenization_chatglm.py): Qwen's, but with digits grouped by up to three.
constexpr const char* kGlm4Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// In id order from the vocabulary size on, as ChatGLM4Tokenizer numbers them.
const char* const kGlm4Specials[] = {"<|endoftext|>",
                                     "[MASK]",
                                     "[gMASK]",
                                     "[sMASK]",
                                     "<sop>",
                                     "<eop>",
                                     "<|system|>",
                                     "<|user|>",
                                     "<|assistant|>",
                                     "<|observation|>",
                                     "<|begin_of_image|>",
                                     "<|end_of_image|>",
                                     "<|begin_of_video|>",
                                     "<|end_of_video|>"};

std::vector<std::string> special_tokens(TiktokenFlavor flavor) {
  if (flavor == TiktokenFlavor::kGlm4) return {std::begin(kGlm4Specials), std::end(kGlm4Specials)};
  std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  for (int i = 0; i < kQwenExtraTokens; ++i) specials.push_back("<|extra_" + std::to_string(i) + "|>");
  return specials;
}

// Standard base64 with padding, as Python's base64.b64decode accepts it; false on anything else.
bool base64_decode(std::string_view in, std::string& out) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  out.clear();
  if (in.empty() || in.size() % 4) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + size_t(k)];
      if (c == '=' && i + 4 == in.size() && k >= 2) {
        v[k] = 0;
        ++pad;
      } else if (pad || (v[k] = value(c)) < 0) {
        return false;
      }
    }
    const uint32_t n = uint32_t(v[0]) << 18 | uint32_t(v[1]) << 12 | uint32_t(v[2]) << 6 | uint32_t(v[3]);
    out += char(n >> 16);
    if (pad < 2) out += char((n >> 8) & 0xFF);
    if (pad < 1) out += char(n & 0xFF);
  }
  return true;
}

std::string byte_level(std::string_view bytes) {
  std::string s;
  for (char c : bytes) s += byte_to_unicode(static_cast<unsigned char>(c));
  return s;
}

}  // namespace

std::shared_ptr<TokenizerImpl> load_tiktoken(const std::filesystem::path& file, TiktokenFlavor flavor) {
  const std::string name = file.string();
  require_regular_file(file);
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(name + ": cannot be read");
  std::vector<std::string> by_rank;
  std::vector<bool> seen;
  std::string line, token;
  size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const std::string where = name + ": line " + std::to_string(line_no);
    const size_t sp = line.find(' ');
    if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
      throw Error(where + " is not 'base64-token rank'");
    if (!base64_decode(std::string_view(line).substr(0, sp), token) || token.empty())
      throw Error(where + " does not start with a base64-encoded, non-empty token");
    const std::string rank_text = line.substr(sp + 1);
    if (rank_text.empty() || rank_text.size() > 9 || rank_text.find_first_not_of("0123456789") != std::string::npos)
      throw Error(where + ": the rank '" + rank_text + "' is not an integer below 10^9");
    const size_t rank = size_t(std::stoul(rank_text));
    if (rank >= by_rank.size()) by_rank.resize(rank + 1), seen.resize(rank + 1, false);
    if (seen[rank]) throw Error(where + ": rank " + rank_text + " appears twice");
    seen[rank] = true;
    by_rank[rank] = byte_level(token);
  }
  if (by_rank.empty()) throw Error(name + ": the vocabulary is empty");
  for (size_t r = 0; r < seen.size(); ++r)
    if (!seen[r]) throw Error(name + ": no token has rank " + std::to_string(r) + " (ranks must be 0..n-1)");

  auto impl = std::make_shared<TokenizerImpl>();
  impl->name = name;
  impl->bpe = std::make_unique<BpeModel>(by_rank);
  if (impl->bpe->vocab().size() != by_rank.size()) throw Error(name + ": a token appears twice");
  for (int b = 0; b < 256; ++b)
    if (impl->bpe->token_to_id(byte_to_unicode(static_cast<unsigned char>(b))) < 0)
      throw Error(name + ": the single byte " + std::to_string(b) + " is not a token (tiktoken needs all 256)");
  const JsonWhere w{name, ""};
  const bool glm4 = flavor == TiktokenFlavor::kGlm4;
  if (!glm4) impl->normalizer = make_normalizer(json{{"type", "NFC"}}, w);
  impl->pre_tokenizer = make_pre_tokenizer(
      json{{"type", "Sequence"},
           {"pretokenizers",
            json::array({json{{"type", "Split"},
                              {"pattern", {{"Regex", glm4 ? kGlm4Pattern : kQwenPattern}}},
                              {"behavior", "Isolated"},
                              {"invert", false}},
                         json{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}},
      w);
  impl->decoder = make_decoder(json{{"type", "ByteLevel"}}, w);
  // Special tokens follow the vocabulary, in the family's order.
  const std::vector<std::string> specials = special_tokens(flavor);
  std::vector<AddedToken> added;
  for (size_t i = 0; i < specials.size(); ++i) {
    AddedToken t;
    t.content = specials[i];
    t.id = int32_t(by_rank.size() + i);
    t.special = true;
    t.normalized = false;
    added.push_back(t);
  }
  impl->added.build(added, impl->normalizer.get());
  impl->eos = int32_t(by_rank.size());  // <|endoftext|>: Qwen's eod token, GLM-4's eos_token
  // ChatGLM4Tokenizer.build_inputs_with_special_tokens puts [gMASK] <sop> before every text; no BOS, no EOS.
  if (glm4) impl->post.prefix = {int32_t(by_rank.size() + 2), int32_t(by_rank.size() + 4)};  // kGlm4Specials[2], [4]
  return impl;
}

}  // namespace kiln::text
