#include "calib/dataset.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/staging_dir.h"
#include "runtime/sampling/rng.h"

namespace kiln::calib {

namespace fs = std::filesystem;

static bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

std::vector<std::string> load_documents(const fs::path& path, const std::string& field) {
  const std::string label = path.string();
  const std::string ext = path.extension().string();
  if (ext != ".txt" && ext != ".jsonl")
    throw Error(label + ": unsupported dataset format '" + ext + "'; expected a .txt or .jsonl file");
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) throw Error(label + ": no such file");
  const std::string content = read_text_file(path);
  std::vector<std::string> docs;
  if (ext == ".txt") {
    if (!content.empty()) docs.push_back(content);
  } else {
    size_t pos = 0;
    for (int64_t line_no = 1; pos < content.size(); ++line_no) {
      size_t end = content.find('\n', pos);
      if (end == std::string::npos) end = content.size();
      const std::string line = content.substr(pos, end - pos);
      pos = end + 1;
      if (blank(line)) continue;  // tolerate blank lines, e.g. a trailing newline pair
      const std::string where = label + ":" + std::to_string(line_no);
      check_json_depth(line, where);
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded()) throw Error(where + ": not valid JSON");
      if (!j.is_object()) throw Error(where + ": expected a JSON object, got " + std::string(j.type_name()));
      auto it = j.find(field);
      if (it == j.end()) throw Error(where + ": no field '" + field + "' (choose one with --field)");
      if (!it->is_string()) throw Error(where + ": field '" + field + "' is " + it->type_name() + ", not a string");
      std::string text = it->get<std::string>();
      if (!text.empty()) docs.push_back(std::move(text));
    }
  }
  if (docs.empty()) throw Error(label + ": the dataset is empty");
  return docs;
}

std::vector<int32_t> token_stream(const Tokenizer& tok, const std::vector<std::string>& docs,
                                  std::optional<int32_t> separator) {
  std::vector<int32_t> stream;
  for (const std::string& d : docs) {
    std::vector<int32_t> ids = tok.encode(d, /*add_special_tokens=*/false);
    if (ids.empty()) continue;
    if (!stream.empty() && separator) stream.push_back(*separator);
    stream.insert(stream.end(), ids.begin(), ids.end());
  }
  return stream;
}

Blocks sample_blocks(const std::vector<int32_t>& stream, int64_t samples, int64_t seqlen, uint64_t seed,
                     const std::string& label) {
  if (samples < 1) throw Error("--samples must be at least 1");
  if (seqlen < 1) throw Error("--seqlen must be at least 1");
  const int64_t total = int64_t(stream.size());
  if (total < seqlen)
    throw Error(label + ": the dataset has " + std::to_string(total) + " tokens, fewer than one block of " +
                std::to_string(seqlen) + " (--seqlen)");
  Blocks b;
  b.seqlen = seqlen;
  b.requested = samples;
  const int64_t k = std::min(samples, total / seqlen);
  // Stars and bars: k sorted offsets into the slack, each block shifted past the ones before it, gives starts that
  // never overlap and may fall anywhere, not only on multiples of seqlen.
  const uint64_t slack = uint64_t(total - k * seqlen);
  const CounterRng rng(seed);
  std::vector<uint64_t> u(static_cast<size_t>(k));
  // The modulo bias is below slack / 2^64: irrelevant for any real dataset, and it keeps the rule easy to restate.
  for (int64_t i = 0; i < k; ++i) u[size_t(i)] = rng.bits(uint64_t(i)) % (slack + 1);
  std::sort(u.begin(), u.end());
  b.tokens.reserve(size_t(k * seqlen));
  for (int64_t i = 0; i < k; ++i) {
    const int64_t start = int64_t(u[size_t(i)]) + i * seqlen;
    b.starts.push_back(start);
    b.tokens.insert(b.tokens.end(), stream.begin() + start, stream.begin() + start + seqlen);
  }
  return b;
}

}  // namespace kiln::calib
