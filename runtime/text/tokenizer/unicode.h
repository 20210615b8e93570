#pragma once
// UTF-8 and Unicode character-class helpers shared by the tokenizer layers. The predicates follow Rust's `char`
// methods because the Hugging Face `tokenizers` library (our parity oracle) is written in Rust.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kiln::text {

// Decodes one code point at s[i] (which must be valid UTF-8) and advances i.
char32_t next_char(std::string_view s, size_t& i);
// Byte length of the UTF-8 sequence that starts with lead byte b (1 for continuation bytes, so loops always advance).
inline size_t char_len(unsigned char b) { return b < 0x80 ? 1 : b < 0xE0 ? (b < 0xC0 ? 1 : 2) : b < 0xF0 ? 3 : 4; }
void append_utf8(std::string& out, char32_t cp);

// True when s is well-formed UTF-8 (no surrogates, no overlongs, nothing above U+10FFFF).
bool is_valid_utf8(std::string_view s);
// Replaces every ill-formed subsequence with U+FFFD using the "maximal subpart" rule (Unicode 3.9, W3C), which is
// exactly what Python's bytes.decode("utf-8", errors="replace") and Rust's String::from_utf8_lossy produce.
std::string sanitize_utf8(std::string_view s);

// Rust char::is_whitespace (the Unicode White_Space property).
bool is_whitespace(char32_t c);
// Rust char::is_alphanumeric: Alphabetic or Numeric (Nd, Nl, No).
bool is_alphanumeric(char32_t c);
// tokenizers' word-character test for single_word added tokens: alphanumeric or '_'.
inline bool is_word_char(char32_t c) { return c == '_' || is_alphanumeric(c); }
// Rust char::is_numeric: general categories Nd, Nl, No.
bool is_numeric(char32_t c);
// tokenizers' punctuation test: ASCII punctuation or any general category P*.
bool is_punctuation(char32_t c);

// Full lowercase mapping per character, as Rust's char::to_lowercase (no context-dependent rules).
std::string to_lowercase(std::string_view s);
// Unicode normalization forms through utf8proc; input must be valid UTF-8.
enum class NormForm { NFC, NFD, NFKC, NFKD };
std::string normalize_unicode(std::string_view s, NormForm form);

// GPT-2 byte-level alphabet: each byte maps to one printable code point.
const std::string& byte_to_unicode(unsigned char b);  // UTF-8 of the code point for byte b
int unicode_to_byte(char32_t c);                      // inverse, -1 when c is not in the alphabet

}  // namespace kiln::text
