// kiln tokenize PATH (--text T | --file F) [--json] [--no-special] [--lines | --json-lines] [--raw] [--decode]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "runtime/core/error.h"
#include "runtime/io/path_safety.h"
#include "runtime/text/tokenizer/detokenizer.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"

namespace kiln::tools {
namespace {

struct TokenizeOptions {
  std::string path, text, file;
  bool json = false, no_special = false, lines = false, json_lines = false, raw = false, decode = false;
  bool skip_special = false, bench = false;
};

std::string read_input(const std::string& file) {
  if (file == "-") {
    std::ostringstream ss;
    ss << std::cin.rdbuf();
    return ss.str();
  }
  require_regular_file(file);
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(file + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void print_result(const Tokenizer& tok, const std::vector<int32_t>& ids, bool as_json) {
  if (as_json) {
    nlohmann::json tokens = nlohmann::json::array();
    for (int32_t id : ids) tokens.push_back(tok.id_to_token(id).value_or(""));
    nlohmann::json out{{"ids", ids}, {"tokens", tokens}};
    print_json(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    return;
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
}

// Ids for --decode: a JSON list, or integers separated by spaces or commas.
std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  auto j = nlohmann::json::parse(s, nullptr, false);
  if (!j.is_discarded() && j.is_array()) {
    for (const auto& v : j) {
      if (!v.is_number_integer()) throw Error("--decode expects integer token ids, got " + v.dump());
      ids.push_back(v.get<int32_t>());
    }
    return ids;
  }
  std::string cur;
  for (char c : s + " ") {
    if (c == ' ' || c == ',' || c == '\n' || c == '\t' || c == '\r') {
      if (cur.empty()) continue;
      try {
        size_t used = 0;
        long long v = std::stoll(cur, &used);
        if (used != cur.size()) throw std::invalid_argument(cur);
        ids.push_back(static_cast<int32_t>(v));
      } catch (const std::exception&) {
        throw Error("--decode expects integer token ids, got '" + cur + "'");
      }
      cur.clear();
    } else {
      cur += c;
    }
  }
  return ids;
}

void print_decoded(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special, bool as_json) {
  std::string text = tok.decode(ids, skip_special);
  if (!as_json) {
    text += '\n';
    std::fwrite(text.data(), 1, text.size(), stdout);
    return;
  }
  IncrementalDetokenizer detok(tok, skip_special);
  nlohmann::json pieces = nlohmann::json::array();
  for (int32_t id : ids) pieces.push_back(detok.push(id));
  pieces.push_back(detok.finish());
  nlohmann::json out{{"text", text}, {"pieces", pieces}};
  print_json(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<TokenizeOptions>();
  sub.add_option("PATH", o->path, "Workspace, Hugging Face model directory, tokenizer directory or tokenizer.json")
      ->required();
  auto* input = sub.add_option_group("input", "Exactly one of --text and --file");
  input->add_option("--text", o->text, "Text to tokenize");
  input->add_option("--file", o->file,
                    "File whose contents are tokenized ('-' for stdin); invalid UTF-8 becomes U+FFFD");
  input->require_option(1);
  sub.add_flag("--json", o->json, "Print {\"ids\": [...], \"tokens\": [...]} instead of space-separated ids");
  sub.add_flag("--no-special", o->no_special, "Do not add BOS/EOS or other post-processor tokens");
  auto* lines = sub.add_flag("--lines", o->lines,
                             "With --file: tokenize each line separately (without its newline) and print one result "
                             "per line");
  sub.add_flag("--json-lines", o->json_lines,
               "With --file: each line is a JSON string (a JSON list of ids with --decode); print one result per line")
      ->excludes(lines);
  sub.add_flag("--raw", o->raw,
               "Run tokenizer.json exactly as the `tokenizers` library does, ignoring tokenizer_config.json "
               "(default: match transformers' AutoTokenizer)");
  sub.add_flag("--decode", o->decode,
               "Decode instead: the input holds token ids (a JSON list, or integers separated by spaces or commas); "
               "--json prints {\"text\": ..., \"pieces\": [...]} where pieces are the streaming detokenizer's output");
  sub.add_flag("--skip-special", o->skip_special, "With --decode: leave special tokens out of the text");
  sub.add_flag("--bench", o->bench,
               "With --lines/--json-lines: print only {\"encode_seconds\": ..., \"texts\": ..., \"tokens\": ...}, "
               "timing encode() alone (used by scripts/bench_tokenizer.py)");
  return [o]() -> int {
    if ((o->lines || o->json_lines) && o->file.empty()) throw Error("--lines and --json-lines need --file");
    Tokenizer tok = Tokenizer::load(locate_tokenizer_files(o->path),
                                    o->raw ? TokenizerCompat::TokenizersLibrary : TokenizerCompat::Transformers);
    const bool special = !o->no_special;
    if (!o->lines && !o->json_lines) {
      std::string text = o->file.empty() ? o->text : read_input(o->file);
      if (o->decode)
        print_decoded(tok, parse_ids(text), o->skip_special, o->json);
      else
        print_result(tok, tok.encode(text, special), o->json);
      return 0;
    }
    std::string all = read_input(o->file);
    size_t start = 0, number = 0;
    std::vector<std::string> bench_texts;
    while (start < all.size()) {
      size_t end = all.find('\n', start);
      if (end == std::string::npos) end = all.size();
      std::string line = all.substr(start, end - start);
      start = end + 1;
      ++number;
      if (o->decode) {
        print_decoded(tok, parse_ids(line), o->skip_special, o->json);
        continue;
      }
      if (o->json_lines) {
        auto j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded() || !j.is_string())
          throw Error(o->file + ": line " + std::to_string(number) + " is not a JSON string");
        line = j.get<std::string>();
      }
      if (o->bench)
        bench_texts.push_back(std::move(line));
      else
        print_result(tok, tok.encode(line, special), o->json);
    }
    if (o->bench) {
      size_t tokens = 0;
      auto t0 = std::chrono::steady_clock::now();
      for (const auto& t : bench_texts) tokens += tok.encode(t, special).size();
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      print_json(nlohmann::json{{"encode_seconds", secs}, {"texts", bench_texts.size()}, {"tokens", tokens}}.dump());
    }
    std::fflush(stdout);
    return 0;
  };
}

}  // namespace

KILN_COMMAND(40, "tokenize", "Tokenize text with a model's tokenizer and print the ids", setup);

}  // namespace kiln::tools
