// Python's printf-style formatting (`"%s: %d" % (a, b)` and jinja2's format filter).
#include <cmath>
#include <cstdio>

#include "runtime/text/jinja/eval.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {

std::string percent_format(const std::string& fmt, const List& args) {
  std::string out;
  size_t next = 0;
  auto take = [&]() -> const Value& {
    if (next >= args.size()) throw Failure("not enough arguments for format string");
    return args[next++];
  };
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    if (++i >= fmt.size()) throw Failure("incomplete format");
    if (fmt[i] == '(') throw Failure("%(name) mapping keys in string formatting are not supported");
    std::string flags;
    while (i < fmt.size() && std::string("-+ #0").find(fmt[i]) != std::string::npos) flags += fmt[i++];
    std::string width, precision;
    bool has_precision = false;
    while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') width += fmt[i++];
    if (i < fmt.size() && fmt[i] == '.') {
      has_precision = true;
      ++i;
      while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') precision += fmt[i++];
    }
    while (i < fmt.size() && (fmt[i] == 'h' || fmt[i] == 'l' || fmt[i] == 'L')) ++i;
    if (i >= fmt.size()) throw Failure("incomplete format");
    if (width.size() > 4 || precision.size() > 3) throw Failure("format width or precision too large");
    char conv = fmt[i];
    std::string spec = "%" + flags + width + (has_precision ? "." + precision : "");
    char buf[1100];
    switch (conv) {
      case '%':
        out += '%';
        break;
      case 's':
      case 'r':
      case 'a': {
        std::u32string text = utf8_decode(conv == 's' ? to_str(take()) : repr(take()));
        if (has_precision && !precision.empty()) text = text.substr(0, std::stoul(precision));
        size_t w = width.empty() ? 0 : std::stoul(width);
        std::string padding(w > text.size() ? w - text.size() : 0, ' ');
        bool left = flags.find('-') != std::string::npos;
        out += left ? utf8_encode(text) + padding : padding + utf8_encode(text);
        break;
      }
      case 'd':
      case 'i':
      case 'u':
      case 'x':
      case 'X':
      case 'o': {
        const Value& v = take();
        if (!v.is_number())
          throw Failure(std::string("%") + conv + " format: a real number is required, not " + v.type_name());
        if ((conv == 'x' || conv == 'X' || conv == 'o') && !v.is_integral())
          throw Failure(std::string("%") + conv + " format: an integer is required, not " + v.type_name());
        long long n = v.is_integral() ? v.as_int() : static_cast<long long>(v.as_float());
        char c = conv == 'i' || conv == 'u' ? 'd' : conv;
        std::snprintf(buf, sizeof buf, (spec + "ll" + c).c_str(), n);
        out += buf;
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G': {
        const Value& v = take();
        if (!v.is_number()) throw Failure("must be real number, not " + v.type_name());
        std::snprintf(buf, sizeof buf, (spec + conv).c_str(), v.as_float());
        out += buf;
        break;
      }
      default:
        throw Failure(std::string("unsupported format character '") + conv + "'");
    }
  }
  if (next < args.size()) throw Failure("not all arguments converted during string formatting");
  return out;
}

}  // namespace kiln::jinja
