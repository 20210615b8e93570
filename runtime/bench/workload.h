#pragma once
// The prompts `kiln bench` sends: synthetic (seeded random token ids of a given length, so every run and every
// target sees exactly the same input) or read from a file, one prompt per line.
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::bench {

struct BenchPrompt {
  std::string text;             // the prompt as text (file prompts); empty for synthetic ones
  std::vector<int32_t> tokens;  // the prompt as token ids: what the engine runs, and what is sent when text is empty
};

// n prompts of input_len ids drawn uniformly from [first_id, vocab_size) with a fixed-seed generator (independent
// of the platform's std:: distributions). kiln::Error when the sizes are unusable.
std::vector<BenchPrompt> synthetic_prompts(int64_t n, int64_t input_len, int64_t vocab_size, uint64_t seed,
                                           int64_t first_id = 0);

// Non-empty lines of a UTF-8 text file ("\n" escapes a newline inside a prompt), cycled to n prompts; tokenized with
// `tok` when given, the way /v1/completions tokenizes a string prompt (special tokens added). kiln::Error naming the
// file when it is missing or has no prompt.
std::vector<BenchPrompt> file_prompts(const std::filesystem::path& path, int64_t n, const Tokenizer* tok);

}  // namespace kiln::bench
