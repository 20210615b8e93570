#include "runtime/bench/workload.h"

#include <fstream>

#include "runtime/core/error.h"
#include "runtime/io/path_safety.h"

namespace kiln::bench {
namespace {

// SplitMix64: a tiny generator whose sequence is the same on every platform, unlike std::uniform_int_distribution.
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string unescape_newlines(const std::string& line) {
  std::string out;
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] == '\\' && i + 1 < line.size() && line[i + 1] == 'n') {
      out += '\n';
      ++i;
    } else {
      out += line[i];
    }
  }
  return out;
}

}  // namespace

std::vector<BenchPrompt> synthetic_prompts(int64_t n, int64_t input_len, int64_t vocab_size, uint64_t seed,
                                           int64_t first_id) {
  if (n < 1) throw Error("--num-prompts must be at least 1");
  if (input_len < 1) throw Error("--input-len must be at least 1");
  if (vocab_size <= first_id) throw Error("the vocabulary is empty");
  uint64_t state = seed;
  std::vector<BenchPrompt> prompts(static_cast<size_t>(n));
  for (BenchPrompt& p : prompts) {
    p.tokens.resize(size_t(input_len));
    for (int32_t& t : p.tokens) t = int32_t(first_id + int64_t(next_random(state) % uint64_t(vocab_size - first_id)));
  }
  return prompts;
}

std::vector<BenchPrompt> file_prompts(const std::filesystem::path& path, int64_t n, const Tokenizer* tok) {
  if (n < 1) throw Error("--num-prompts must be at least 1");
  try {
    require_regular_file(path);
  } catch (const Error& e) {
    throw Error(std::string("the prompt file ") + e.what());
  }
  std::ifstream in(path);
  if (!in) throw Error("cannot read the prompt file " + path.string());
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") != std::string::npos) lines.push_back(unescape_newlines(line));
  }
  if (lines.empty()) throw Error("the prompt file " + path.string() + " has no prompt");
  std::vector<BenchPrompt> prompts(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    prompts[size_t(i)].text = lines[size_t(i) % lines.size()];
    if (tok) prompts[size_t(i)].tokens = tok->encode(prompts[size_t(i)].text);
  }
  return prompts;
}

}  // namespace kiln::bench
