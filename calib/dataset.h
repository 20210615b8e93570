#pragma once
// Calibration data: documents from a local .txt or .jsonl file, tokenized into one token stream, from which a seeded
// PRNG draws non-overlapping blocks of `seqlen` tokens. The procedure is documented in docs/calibration.md and is
// simple enough to re-implement exactly (tests/python/test_calibrate.py does).
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::calib {

// The documents of a dataset file. `.txt`: the whole file is one document. `.jsonl`: one JSON object per non-blank
// line, the document being its string field `field`. Throws kiln::Error naming the file (and line) for an unknown
// extension, a malformed line, a missing or non-string field, or a dataset without any text.
std::vector<std::string> load_documents(const std::filesystem::path& path, const std::string& field = "text");

// Each document encoded without special tokens, documents joined by `separator` (the model's EOS) when given.
// Empty documents contribute nothing.
std::vector<int32_t> token_stream(const Tokenizer& tok, const std::vector<std::string>& docs,
                                  std::optional<int32_t> separator);

struct Blocks {
  int64_t seqlen = 0;
  int64_t requested = 0;        // samples asked for; more than fit is not an error, see sample_blocks
  std::vector<int64_t> starts;  // offsets into the stream, ascending, non-overlapping
  std::vector<int32_t> tokens;  // [starts.size()][seqlen]
  int64_t count() const { return int64_t(starts.size()); }
};

// Draws min(samples, stream / seqlen) non-overlapping blocks: with k blocks and slack S = stream - k * seqlen,
// u_i = CounterRng(seed).bits(i) mod (S + 1) for i < k, sorted ascending, start_i = u_i + i * seqlen. Throws when
// the stream is shorter than one block. `label` names the data file in errors.
Blocks sample_blocks(const std::vector<int32_t>& stream, int64_t samples, int64_t seqlen, uint64_t seed,
                     const std::string& label);

}  // namespace kiln::calib
