// Python methods on str, dict, list and tuple values (`message.content.strip()`, `tool.items()`). Mutating methods are
// refused exactly as jinja2's ImmutableSandboxedEnvironment refuses them; Python methods kiln does not implement fail
// when called rather than silently returning undefined.
#include <set>

#include "runtime/text/jinja/eval.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {
namespace {

using Method = Value (*)(const Value& self, Args& args);

std::string arg_str(const Value& v, const char* method) {
  if (!v.is_string()) throw Failure(std::string(method) + "() argument must be str, not " + v.type_name());
  return v.str();
}

// None or a str (strip chars, split separator).
const std::string* opt_str(const Value& v, const char* method, std::string& storage) {
  if (v.is_none() || v.is_undefined()) return nullptr;
  storage = arg_str(v, method);
  return &storage;
}

long opt_int(const Value& v, long dflt) {
  if (v.is_undefined() || v.is_none()) return dflt;
  if (!v.is_integral()) throw Failure("'" + v.type_name() + "' object cannot be interpreted as an integer");
  return static_cast<long>(v.as_int());
}

Value str_list(const std::vector<std::string>& parts) {
  List out;
  for (const auto& p : parts) out.push_back(Value::string(p));
  return Value::list(std::move(out));
}

bool affix_match(const Value& self, Args& a, const char* method, bool suffix) {
  a.check(method, 1, {});
  Value arg = a.get(0, nullptr);
  std::vector<std::string> options;
  if (arg.is_string()) {
    options.push_back(arg.str());
  } else if (arg.kind() == Value::Kind::Tuple) {
    for (const Value& v : arg.items()) options.push_back(arg_str(v, method));
  } else {
    throw Failure(std::string(method) + " first arg must be str or a tuple of str, not " + arg.type_name());
  }
  const std::string& s = self.str();
  for (const auto& o : options) {
    if (o.size() > s.size()) continue;
    if (suffix ? s.compare(s.size() - o.size(), o.size(), o) == 0 : s.compare(0, o.size(), o) == 0) return true;
  }
  return false;
}

template <bool (*Pred)(char32_t)>
Value all_chars(const Value& self, Args& a) {
  a.check("is", 0, {});
  std::u32string cps = utf8_decode(self.str());
  if (cps.empty()) return Value::boolean(false);
  for (char32_t c : cps)
    if (!Pred(c)) return Value::boolean(false);
  return Value::boolean(true);
}

bool is_alpha(char32_t c) { return is_letter(c); }
bool is_digit(char32_t c) { return is_decimal(c); }
bool is_alnum(char32_t c) { return is_letter(c) || is_decimal(c); }

Value str_format(const Value& self, Args& a) {
  const std::string& f = self.str();
  std::string out;
  size_t auto_index = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    char c = f[i];
    if (c == '}') {
      if (i + 1 < f.size() && f[i + 1] == '}') {
        out += '}';
        ++i;
        continue;
      }
      throw Failure("Single '}' encountered in format string");
    }
    if (c != '{') {
      out += c;
      continue;
    }
    if (i + 1 < f.size() && f[i + 1] == '{') {
      out += '{';
      ++i;
      continue;
    }
    size_t end = f.find('}', i);
    if (end == std::string::npos) throw Failure("Single '{' encountered in format string");
    std::string field = f.substr(i + 1, end - i - 1);
    i = end;
    char conv = 0;
    size_t colon = field.find(':');
    if (colon != std::string::npos) {
      if (colon + 1 < field.size()) throw Failure("format specs in str.format() are not supported");
      field = field.substr(0, colon);
    }
    size_t bang = field.find('!');
    if (bang != std::string::npos) {
      if (bang + 2 != field.size() || (field[bang + 1] != 'r' && field[bang + 1] != 's'))
        throw Failure("unsupported conversion in str.format()");
      conv = field[bang + 1];
      field = field.substr(0, bang);
    }
    if (field.find_first_of(".[") != std::string::npos)
      throw Failure("attribute and index lookups in str.format() are not supported");
    Value v;
    if (field.empty() || (field[0] >= '0' && field[0] <= '9')) {
      size_t idx = field.empty() ? auto_index++ : std::stoul(field);
      if (idx >= a.pos.size()) throw Failure("Replacement index " + std::to_string(idx) + " out of range");
      v = a.pos[idx];
    } else {
      bool found = false;
      for (const auto& [k, kv] : a.kw)
        if (k == field) {
          v = kv;
          found = true;
        }
      if (!found) throw Failure("KeyError: '" + field + "'");
    }
    out += conv == 'r' ? repr(v) : to_str(v);
  }
  return Value::string(std::move(out));
}

Value str_method(const std::string& name, const Value& self, Args& a) {
  const std::string& s = self.str();
  std::string tmp;
  if (name == "startswith") return Value::boolean(affix_match(self, a, "startswith", false));
  if (name == "endswith") return Value::boolean(affix_match(self, a, "endswith", true));
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    a.check(name.c_str(), 1, {});
    const std::string* chars = opt_str(a.get(0, nullptr), name.c_str(), tmp);
    return Value::string(py_strip(s, chars, name != "rstrip", name != "lstrip"));
  }
  if (name == "split" || name == "rsplit") {
    a.check(name.c_str(), 2, {"sep", "maxsplit"});
    const std::string* sep = opt_str(a.get(0, "sep"), name.c_str(), tmp);
    long maxsplit = opt_int(a.get(1, "maxsplit"), -1);
    return str_list(name == "split" ? py_split(s, sep, maxsplit) : py_rsplit(s, sep, maxsplit));
  }
  if (name == "splitlines") {
    a.check("splitlines", 1, {"keepends"});
    return str_list(py_splitlines(s, a.get(0, "keepends").truthy()));
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize" || name == "casefold") {
    a.check(name.c_str(), 0, {});
    if (name == "upper") return Value::string(py_upper(s));
    if (name == "title") return Value::string(py_title(s));
    if (name == "capitalize") return Value::string(py_capitalize(s));
    return Value::string(py_lower(s));
  }
  if (name == "replace") {
    a.check("replace", 3, {"count"});
    std::string old = arg_str(a.get(0, nullptr), "replace"), with = arg_str(a.get(1, nullptr), "replace");
    return Value::string(py_replace(s, old, with, opt_int(a.get(2, "count"), -1)));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
    a.check(name.c_str(), 1, {});
    std::string sub = arg_str(a.get(0, nullptr), name.c_str());
    if (name == "count") return Value::integer(py_count(s, sub));
    long pos = py_find(s, sub, name[0] == 'r');
    if (pos < 0 && name.find("index") != std::string::npos) throw Failure("substring not found");
    return Value::integer(pos);
  }
  if (name == "format") return str_format(self, a);
  if (name == "join") {
    a.check("join", 1, {});
    std::string out;
    List items = iterate(a.get(0, nullptr));
    for (size_t i = 0; i < items.size(); ++i) {
      if (!items[i].is_string())
        throw Failure("sequence item " + std::to_string(i) + ": expected str instance, " + items[i].type_name() +
                      " found");
      if (i) out += s;
      out += items[i].str();
    }
    return Value::string(std::move(out));
  }
  if (name == "removeprefix" || name == "removesuffix") {
    a.check(name.c_str(), 1, {});
    std::string affix = arg_str(a.get(0, nullptr), name.c_str());
    if (affix.size() <= s.size()) {
      if (name == "removeprefix" && s.compare(0, affix.size(), affix) == 0)
        return Value::string(s.substr(affix.size()));
      if (name == "removesuffix" && s.compare(s.size() - affix.size(), affix.size(), affix) == 0)
        return Value::string(s.substr(0, s.size() - affix.size()));
    }
    return self;
  }
  if (name == "center") {
    a.check("center", 2, {});
    std::u32string fill = a.has(1, nullptr) ? utf8_decode(arg_str(a.get(1, nullptr), "center")) : U" ";
    if (fill.size() != 1) throw Failure("The fill character must be exactly one character long");
    return Value::string(py_center(s, opt_int(a.get(0, nullptr), 0), fill[0]));
  }
  if (name == "zfill") {
    a.check("zfill", 1, {});
    std::u32string cps = utf8_decode(s);
    long width = opt_int(a.get(0, nullptr), 0);
    if (width <= static_cast<long>(cps.size())) return self;
    size_t sign = !cps.empty() && (cps[0] == '+' || cps[0] == '-') ? 1 : 0;
    cps.insert(sign, std::u32string(static_cast<size_t>(width) - cps.size(), U'0'));
    return Value::string(utf8_encode(cps));
  }
  if (name == "isspace") return all_chars<is_py_space>(self, a);
  if (name == "isdigit") return all_chars<is_digit>(self, a);
  if (name == "isalpha") return all_chars<is_alpha>(self, a);
  if (name == "isalnum") return all_chars<is_alnum>(self, a);
  if (name == "isupper" || name == "islower") {
    a.check(name.c_str(), 0, {});
    bool any_cased = false;
    for (char32_t c : utf8_decode(s)) {
      if (!is_cased(c)) continue;
      any_cased = true;
      if (name == "isupper" ? !is_upper(c) : !is_lower(c)) return Value::boolean(false);
    }
    return Value::boolean(any_cased);
  }
  throw Failure("str." + name + "() is not supported in chat templates");
}

Value items_of(const Dict& d) {
  List out;
  for (const auto& [k, v] : d.entries) out.push_back(Value::tuple({k, v}));
  return Value::list(std::move(out));
}

Value dict_method(const std::string& name, const Value& self, Args& a) {
  const Dict& d = self.dict_ref();
  if (name == "items" || name == "keys" || name == "values") {
    a.check(name.c_str(), 0, {});
    if (name == "items") return items_of(d);
    List out;
    for (const auto& [k, v] : d.entries) out.push_back(name == "keys" ? k : v);
    return Value::list(std::move(out));
  }
  if (name == "get") {
    a.check("get", 2, {});
    const Value* v = d.find(a.get(0, nullptr));
    return v ? *v : a.get(1, nullptr, Value::none());
  }
  if (name == "copy") {
    a.check("copy", 0, {});
    Value out = Value::dict();
    out.dict_ref().entries = d.entries;
    out.dict_ref().depth = d.depth;
    return out;
  }
  throw Failure("dict." + name + "() is not supported in chat templates");
}

Value seq_method(const std::string& name, const Value& self, Args& a) {
  const List& items = self.items();
  if (name == "index" || name == "count") {
    a.check(name.c_str(), 1, {});
    Value x = a.get(0, nullptr);
    int64_t n = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      if (!equals(items[i], x)) continue;
      if (name == "index") return Value::integer(static_cast<int64_t>(i));
      ++n;
    }
    if (name == "index") throw Failure(repr(x) + " is not in " + self.type_name());
    return Value::integer(n);
  }
  if (name == "copy") {
    a.check("copy", 0, {});
    return Value::list(items);
  }
  throw Failure(self.type_name() + "." + name + "() is not supported in chat templates");
}

const std::set<std::string> kStrMethods = {
    "capitalize",   "casefold",   "center",    "count",       "encode",    "endswith",     "expandtabs",   "find",
    "format",       "format_map", "index",     "isalnum",     "isalpha",   "isascii",      "isdecimal",    "isdigit",
    "isidentifier", "islower",    "isnumeric", "isprintable", "isspace",   "istitle",      "isupper",      "join",
    "ljust",        "lower",      "lstrip",    "maketrans",   "partition", "removeprefix", "removesuffix", "replace",
    "rfind",        "rindex",     "rjust",     "rpartition",  "rsplit",    "rstrip",       "split",        "splitlines",
    "startswith",   "strip",      "swapcase",  "title",       "translate", "upper",        "zfill"};
const std::set<std::string> kDictMethods = {"copy", "fromkeys", "get", "items", "keys", "values"};
const std::set<std::string> kDictMutators = {"clear", "pop", "popitem", "setdefault", "update"};
const std::set<std::string> kListMethods = {"copy", "count", "index"};
const std::set<std::string> kListMutators = {"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"};

}  // namespace

Value bound_method(const Value& obj, const std::string& name) {
  Value (*impl)(const std::string&, const Value&, Args&) = nullptr;
  if (obj.is_string() && kStrMethods.count(name)) {
    impl = str_method;
  } else if (obj.is_dict()) {
    if (kDictMutators.count(name))
      return Value::undefined("access to attribute '" + name + "' of 'dict' object is unsafe.");
    if (kDictMethods.count(name)) impl = dict_method;
  } else if (obj.is_sequence()) {
    bool list = obj.kind() == Value::Kind::List;
    if (list && kListMutators.count(name))
      return Value::undefined("access to attribute '" + name + "' of 'list' object is unsafe.");
    if (kListMethods.count(name) && (list || name != "copy")) impl = seq_method;
  }
  if (!impl) return Value();
  return Value::function(name, [impl, obj, name](Args& a) { return impl(name, obj, a); });
}

}  // namespace kiln::jinja
