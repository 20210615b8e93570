#pragma once
// Splits template source into tokens the way jinja2's lexer does with trim_blocks=True and lstrip_blocks=True, so
// that whitespace control (`-`, `+`, trimmed newlines, stripped indentation) and newline normalisation match it byte
// for byte. Raw blocks come out as plain Data tokens.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace kiln::jinja {

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // data, name, operator, or the decoded string literal
  int line = 1;
  int64_t ival = 0;
  double fval = 0;
};

// Throws kiln::Error ("chat template line N: ...") on malformed input.
std::vector<Token> tokenize_template(std::string_view source);

}  // namespace kiln::jinja
