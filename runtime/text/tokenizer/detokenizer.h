#pragma once
// Streaming detokenization: feed ids one at a time, get text as soon as it is final. Text is emitted only when the
// decoded window does not end in U+FFFD, so a UTF-8 character split over byte-level tokens or a byte-fallback
// sequence (<0xE4><0xBD><0xA0>) is held back until complete. The concatenation of everything returned by push() and
// finish() equals Tokenizer::decode() of all ids.
//
// It decodes a short window (the tokens since the last emission plus one token of left context), so decoders that
// treat the first token specially (Strip, Metaspace) see the same context as a full decode. A stream that really
// ends in U+FFFD is released by finish().
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln {

class IncrementalDetokenizer {
 public:
  explicit IncrementalDetokenizer(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  // Returns the new final text after appending `id` (often empty).
  std::string push(int32_t id);
  // Returns whatever is still held back; call once at the end of the stream.
  std::string finish();
  void reset();

 private:
  std::string emit(bool force);

  Tokenizer tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0;  // start of the decode window (left context)
  size_t read_ = 0;    // ids before this one have been emitted
};

}  // namespace kiln
