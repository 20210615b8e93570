#include "runtime/text/tokenizer/decoder.h"

#include <cctype>

#include "runtime/text/tokenizer/normalizer.h"
#include "runtime/text/tokenizer/unicode.h"

namespace kiln::text {

namespace {

class ByteLevelDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      size_t start = bytes.size();
      bool mapped = true;
      for (size_t i = 0; i < t.size();) {
        int b = unicode_to_byte(next_char(t, i));
        if (b < 0) {
          mapped = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      if (!mapped) {  // e.g. an added token: HF keeps its raw UTF-8
        bytes.resize(start);
        bytes += t;
      }
    }
    tokens.assign(1, sanitize_utf8(bytes));
  }
};

// "<0xAB>" -> 0xAB; HF parses the two characters with u8::from_str_radix, which also accepts a leading '+'.
int parse_byte_token(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) {
    return std::isxdigit(static_cast<unsigned char>(c)) ? (c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10) : -1;
  };
  int hi = hex(t[3]), lo = hex(t[4]);
  if (t[3] == '+' && lo >= 0) return lo;
  return hi >= 0 && lo >= 0 ? hi * 16 + lo : -1;
}

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (is_valid_utf8(pending))
        out.push_back(pending);
      else  // HF emits one replacement character per byte of an invalid run
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
      pending.clear();
    };
    for (auto& t : tokens) {
      int b = parse_byte_token(t);
      if (b >= 0) {
        pending.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t c, size_t start, size_t stop) : content_(c), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::u32string chars;
      for (size_t i = 0; i < t.size();) chars.push_back(next_char(t, i));
      size_t b = 0, e = chars.size();
      for (size_t i = 0; i < start_ && i < chars.size() && chars[i] == content_; ++i) b = i + 1;
      for (size_t i = 0; i < stop_ && i < chars.size() && chars[chars.size() - 1 - i] == content_; ++i)
        e = chars.size() - 1 - i;
      std::string out;
      for (size_t i = b; i < e; ++i) append_utf8(out, chars[i]);  // HF panics when the cuts cross; we return ""
      t = std::move(out);
    }
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(Pattern p, std::string content) : pattern_(std::move(p)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      Piece p{std::move(t), 0, -1};
      replace_all(p, pattern_, content_);
      t = std::move(p.text);
    }
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(char32_t rep, bool drop_first) : rep_(rep), drop_first_(drop_first) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      const std::string& t = tokens[k];
      std::string out;
      out.reserve(t.size());
      for (size_t i = 0; i < t.size();) {
        size_t at = i;
        if (next_char(t, i) != rep_) {
          out.append(t, at, i - at);
        } else if (k != 0 || !drop_first_) {  // HF drops every replacement char of the first token
          out.push_back(' ');
        }
      }
      tokens[k] = std::move(out);
    }
  }

 private:
  char32_t rep_;
  bool drop_first_;
};

class BpeSuffixDecoder final : public Decoder {
 public:
  explicit BpeSuffixDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      Piece p{std::move(tokens[k]), 0, -1};
      replace_all(p, Pattern::literal(suffix_), k + 1 == tokens.size() ? "" : " ");
      tokens[k] = std::move(p.text);
    }
  }

 private:
  std::string suffix_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> items) : items_(std::move(items)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& d : items_) d->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> items_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(const json& j, const JsonWhere& w) {
  if (j.is_null()) return nullptr;
  std::string type = require_string(j, "type", w);
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    int64_t start = opt_int(j, "start", 0, w), stop = opt_int(j, "stop", 0, w);
    if (start < 0 || stop < 0) w.fail("start and stop must not be negative");
    return std::make_unique<StripDecoder>(require_char(j, "content", w), static_cast<size_t>(start),
                                          static_cast<size_t>(stop));
  }
  if (type == "Replace")
    return std::make_unique<ReplaceDecoder>(make_pattern(require(j, "pattern", w), w / "pattern"),
                                            require_string(j, "content", w));
  if (type == "Metaspace") {
    bool drop_first = true;
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null())
      drop_first = opt_string(j, "prepend_scheme", "always", w) != "never";
    else
      drop_first = opt_bool(j, "add_prefix_space", true, w);
    return std::make_unique<MetaspaceDecoder>(require_char(j, "replacement", w), drop_first);
  }
  if (type == "BPEDecoder") return std::make_unique<BpeSuffixDecoder>(opt_string(j, "suffix", "</w>", w));
  if (type == "Sequence") {
    const json& list = require(j, "decoders", w);
    if (!list.is_array()) (w / "decoders").fail("must be a list");
    std::vector<std::unique_ptr<Decoder>> items;
    for (size_t i = 0; i < list.size(); ++i)
      if (auto d = make_decoder(list[i], (w / "decoders")[i])) items.push_back(std::move(d));
    return std::make_unique<SequenceDecoder>(std::move(items));
  }
  (w / "type")
      .fail("is the unsupported decoder '" + type +
            "' (kiln supports ByteLevel, ByteFallback, Fuse, Strip, Replace, Metaspace, BPEDecoder, Sequence)");
}

std::unique_ptr<Decoder> make_llama_decoder(bool strip_leading_space) {
  std::vector<std::unique_ptr<Decoder>> items;
  items.push_back(std::make_unique<ReplaceDecoder>(Pattern::literal("\xE2\x96\x81"), " "));
  items.push_back(std::make_unique<ByteFallbackDecoder>());
  items.push_back(std::make_unique<FuseDecoder>());
  if (strip_leading_space) items.push_back(std::make_unique<StripDecoder>(U' ', 1, 0));
  return std::make_unique<SequenceDecoder>(std::move(items));
}

}  // namespace kiln::text
