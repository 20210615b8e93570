#pragma once
// Code-point level helpers: Python strings index, slice, strip and case-map by code point, while kiln keeps UTF-8.
#include <string>
#include <string_view>
#include <vector>

namespace kiln::jinja {

// Invalid UTF-8 bytes decode to U+FFFD so that slicing never splits a sequence.
std::u32string utf8_decode(std::string_view s);
std::string utf8_encode(std::u32string_view s);
void utf8_append(std::string& out, char32_t c);
size_t utf8_length(std::string_view s);

bool is_py_space(char32_t c);      // str.isspace()
bool is_py_printable(char32_t c);  // str.isprintable()
bool is_word_char(char32_t c);     // regex \w
bool is_cased(char32_t c);
bool is_letter(char32_t c);   // category L*
bool is_decimal(char32_t c);  // category Nd
bool is_upper(char32_t c);
bool is_lower(char32_t c);
char32_t to_upper(char32_t c);
char32_t to_lower(char32_t c);
char32_t to_title(char32_t c);

// Python's str methods (the subset chat templates use).
std::string py_upper(std::string_view s);
std::string py_lower(std::string_view s);
std::string py_title(std::string_view s);
std::string py_capitalize(std::string_view s);
// chars == nullptr strips whitespace; otherwise the code points of *chars.
std::string py_strip(std::string_view s, const std::string* chars, bool left, bool right);
std::vector<std::string> py_split(std::string_view s, const std::string* sep, long maxsplit);
std::vector<std::string> py_rsplit(std::string_view s, const std::string* sep, long maxsplit);
std::vector<std::string> py_splitlines(std::string_view s, bool keepends);
std::string py_replace(std::string_view s, std::string_view old, std::string_view with, long count);
long py_find(std::string_view s, std::string_view sub, bool reverse);  // code-point index or -1
long py_count(std::string_view s, std::string_view sub);
std::string py_center(std::string_view s, long width, char32_t fill);

}  // namespace kiln::jinja
