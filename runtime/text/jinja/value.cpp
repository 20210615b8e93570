#include "runtime/text/jinja/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {

Value Value::undefined(std::string hint) {
  Value v;
  v.s_ = std::make_shared<const std::string>(std::move(hint));
  return v;
}
Value Value::none() {
  Value v;
  v.kind_ = Kind::None;
  return v;
}
Value Value::boolean(bool b) {
  Value v;
  v.kind_ = Kind::Bool;
  v.b_ = b;
  return v;
}
Value Value::integer(int64_t i) {
  Value v;
  v.kind_ = Kind::Int;
  v.i_ = i;
  return v;
}
Value Value::number(double f) {
  Value v;
  v.kind_ = Kind::Float;
  v.f_ = f;
  return v;
}
Value Value::string(std::string s, bool markup) {
  Value v;
  v.kind_ = Kind::String;
  v.markup_ = markup;
  v.s_ = std::make_shared<const std::string>(std::move(s));
  return v;
}
Value Value::list(List items) {
  Value v;
  v.kind_ = Kind::List;
  int deepest = 0;
  for (const Value& item : items) deepest = std::max(deepest, item.depth());
  v.depth_ = static_cast<uint16_t>(std::min(deepest + 1, 0xFFFF));
  v.list_ = std::make_shared<List>(std::move(items));
  return v;
}
Value Value::tuple(List items) {
  Value v = list(std::move(items));
  v.kind_ = Kind::Tuple;
  return v;
}
Value Value::dict() {
  Value v;
  v.kind_ = Kind::Dict;
  v.dict_ = std::make_shared<Dict>();
  return v;
}
Value Value::name_space(std::string type_name) {
  Value v;
  v.kind_ = Kind::Namespace;
  v.dict_ = std::make_shared<Dict>();
  v.dict_->type_name = std::move(type_name);
  return v;
}
Value Value::function(std::string name, std::function<Value(Args&)> fn) {
  Value v;
  v.kind_ = Kind::Callable;
  v.fn_ = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
  return v;
}

bool Value::holds(const Dict* target) const {
  if (kind_ == Kind::Dict || kind_ == Kind::Namespace) {
    if (dict_.get() == target) return true;
    for (const auto& [key, value] : dict_->entries)
      if (key.holds(target) || value.holds(target)) return true;
  } else if (kind_ == Kind::List || kind_ == Kind::Tuple) {
    for (const Value& item : *list_)
      if (item.holds(target)) return true;
  }
  return false;
}

int Value::depth() const {
  if (kind_ == Kind::List || kind_ == Kind::Tuple) return depth_;
  if (kind_ == Kind::Dict || kind_ == Kind::Namespace) return std::min(dict_->depth, 0xFFFF) + 1;
  return 0;
}

namespace {

// Every recursive walk over values calls this once per level.
void check_depth(int depth) {
  if (depth > kMaxValueDepth)
    throw Failure("values nested deeper than " + std::to_string(kMaxValueDepth) + " levels (or holding themselves)");
}

}  // namespace

std::string Value::type_name() const {
  switch (kind_) {
    case Kind::Undefined:
      return "Undefined";
    case Kind::None:
      return "NoneType";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return "str";
    case Kind::List:
      return "list";
    case Kind::Tuple:
      return "tuple";
    case Kind::Dict:
      return "dict";
    case Kind::Namespace:
      return dict_->type_name;
    case Kind::Callable:
      return "function";
  }
  return "object";
}

bool Value::truthy() const {
  switch (kind_) {
    case Kind::Undefined:
    case Kind::None:
      return false;
    case Kind::Bool:
      return b_;
    case Kind::Int:
      return i_ != 0;
    case Kind::Float:
      return f_ != 0.0;
    case Kind::String:
      return !s_->empty();
    case Kind::List:
    case Kind::Tuple:
      return !list_->empty();
    case Kind::Dict:
      return !dict_->entries.empty();
    default:
      return true;
  }
}

const Value* Dict::find(const Value& key) const {
  for (const auto& [k, v] : entries)
    if (equals(k, key)) return &v;
  return nullptr;
}

const Value* Dict::find(const std::string& key) const {
  for (const auto& [k, v] : entries)
    if (k.is_string() && k.str() == key) return &v;
  return nullptr;
}

void Dict::set(const Value& key, Value value) {
  depth = std::max({depth, key.depth(), value.depth()});
  for (auto& [k, v] : entries)
    if (equals(k, key)) {
      v = std::move(value);
      return;
    }
  entries.emplace_back(key, std::move(value));
}

Value Args::get(size_t index, const char* name, Value fallback) const {
  if (index < pos.size()) return pos[index];
  for (const auto& [k, v] : kw)
    if (name && k == name) return v;
  return fallback;
}

bool Args::has(size_t index, const char* name) const {
  if (index < pos.size()) return true;
  for (const auto& [k, v] : kw)
    if (name && k == name) return true;
  return false;
}

void Args::check(const char* fn, size_t max_pos, std::initializer_list<const char*> names) const {
  if (pos.size() > max_pos)
    throw Failure(std::string(fn) + "() takes at most " + std::to_string(max_pos) + " positional arguments (" +
                  std::to_string(pos.size()) + " given)");
  for (const auto& [k, v] : kw) {
    bool known = false;
    for (const char* n : names) known = known || k == n;
    if (!known) throw Failure(std::string(fn) + "() got an unexpected keyword argument '" + k + "'");
  }
}

bool equals(const Value& a, const Value& b, int depth) {
  using K = Value::Kind;
  check_depth(depth);
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.as_float() == b.as_float();
    return a.as_int() == b.as_int();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case K::Undefined:
    case K::None:
      return true;
    case K::String:
      return a.str() == b.str();
    case K::List:
    case K::Tuple: {
      if (a.items().size() != b.items().size()) return false;
      for (size_t i = 0; i < a.items().size(); ++i)
        if (!equals(a.items()[i], b.items()[i], depth + 1)) return false;
      return true;
    }
    case K::Dict: {
      if (a.dict_ref().entries.size() != b.dict_ref().entries.size()) return false;
      for (const auto& [k, v] : a.dict_ref().entries) {
        const Value* other = b.dict_ref().find(k);
        if (!other || !equals(v, *other, depth + 1)) return false;
      }
      return true;
    }
    case K::Namespace:
      return &a.dict_ref() == &b.dict_ref();
    case K::Callable:
      return &a.callable() == &b.callable();
    default:
      return false;
  }
}

int compare(const Value& a, const Value& b, const char* op, int depth) {
  check_depth(depth);
  if (a.is_undefined() || b.is_undefined()) throw Failure(a.is_undefined() ? a.str() : b.str());
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) {
      double x = a.as_float(), y = b.as_float();
      return x < y ? -1 : (x > y ? 1 : 0);
    }
    return a.as_int() < b.as_int() ? -1 : (a.as_int() > b.as_int() ? 1 : 0);
  }
  if (a.is_string() && b.is_string()) return a.str().compare(b.str()) < 0 ? -1 : (a.str() == b.str() ? 0 : 1);
  if (a.kind() == b.kind() && a.is_sequence()) {
    const List &x = a.items(), &y = b.items();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i)
      if (!equals(x[i], y[i], depth + 1)) return compare(x[i], y[i], op, depth + 1);
    return x.size() < y.size() ? -1 : (x.size() > y.size() ? 1 : 0);
  }
  throw Failure(std::string("'") + op + "' not supported between instances of '" + a.type_name() + "' and '" +
                b.type_name() + "'");
}

std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string s(buf, res.ptr);
  std::string out;
  if (s[0] == '-') {
    out = "-";
    s.erase(0, 1);
  }
  size_t e = s.find('e');
  int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (s[i] != '.') digits += s[i];
  int n = static_cast<int>(digits.size());
  if (exp >= -4 && exp < 16) {
    int point = exp + 1;  // digits before the decimal point
    if (point <= 0)
      out += "0." + std::string(-point, '0') + digits;
    else if (point >= n)
      out += digits + std::string(point - n, '0') + ".0";
    else
      out += digits.substr(0, point) + "." + digits.substr(point);
  } else {
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return out;
}

std::string py_str_repr(const std::string& s) {
  bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : utf8_decode(s)) {
    char buf[16];
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    } else if (c < 0x80 || is_py_printable(c)) {
      utf8_append(out, c);
    } else {
      const char* fmt = c <= 0xFF ? "\\x%02x" : (c <= 0xFFFF ? "\\u%04x" : "\\U%08x");
      std::snprintf(buf, sizeof buf, fmt, static_cast<unsigned>(c));
      out += buf;
    }
  }
  out += quote;
  return out;
}

static std::string repr_items(const List& items, const char* open, const char* close, bool tuple, int depth) {
  std::string out = open;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    out += repr(items[i], depth + 1);
  }
  if (tuple && items.size() == 1) out += ",";
  return out + close;
}

static std::string repr_dict(const Dict& d, int depth) {
  std::string out = "{";
  for (size_t i = 0; i < d.entries.size(); ++i) {
    if (i) out += ", ";
    out += repr(d.entries[i].first, depth + 1) + ": " + repr(d.entries[i].second, depth + 1);
  }
  return out + "}";
}

std::string repr(const Value& v, int depth) {
  using K = Value::Kind;
  check_depth(depth);
  switch (v.kind()) {
    case K::Undefined:
      return "Undefined";
    case K::String:
      return py_str_repr(v.str());
    case K::List:
      return repr_items(v.items(), "[", "]", false, depth);
    case K::Tuple:
      return repr_items(v.items(), "(", ")", true, depth);
    case K::Dict:
      return repr_dict(v.dict_ref(), depth);
    default:
      return to_str(v, depth);
  }
}

std::string to_str(const Value& v, int depth) {
  using K = Value::Kind;
  check_depth(depth);
  switch (v.kind()) {
    case K::Undefined:
      return "";
    case K::None:
      return "None";
    case K::Bool:
      return v.as_bool() ? "True" : "False";
    case K::Int:
      return std::to_string(v.as_int());
    case K::Float:
      return py_float_repr(v.as_float());
    case K::String:
      return v.str();
    case K::Namespace:
      if (v.dict_ref().type_name == "Namespace") return "<Namespace " + repr_dict(v.dict_ref(), depth) + ">";
      throw Failure("printing a " + v.type_name() + " object is not supported");
    case K::Callable:
      throw Failure("printing the function '" + v.callable().name + "' is not supported");
    default:
      return repr(v, depth);
  }
}

Value from_json(const nlohmann::ordered_json& j, int depth) {
  using T = nlohmann::ordered_json::value_t;
  if ((j.is_array() || j.is_object()) && depth >= kMaxJsonDepth)
    throw Failure("JSON nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
  switch (j.type()) {
    case T::null:
      return Value::none();
    case T::boolean:
      return Value::boolean(j.get<bool>());
    case T::number_integer:
      return Value::integer(j.get<int64_t>());
    case T::number_unsigned: {
      auto u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) throw Failure("integer " + std::to_string(u) + " is too large");
      return Value::integer(static_cast<int64_t>(u));
    }
    case T::number_float:
      return Value::number(j.get<double>());
    case T::string:
      return Value::string(j.get<std::string>());
    case T::array: {
      List items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json(e, depth + 1));
      return Value::list(std::move(items));
    }
    case T::object: {
      Value d = Value::dict();
      Dict& dict = d.dict_ref();
      for (const auto& [k, e] : j.items()) {
        Value v = from_json(e, depth + 1);
        dict.depth = std::max(dict.depth, v.depth());
        dict.entries.emplace_back(Value::string(k), std::move(v));  // JSON keys are unique: no lookup needed
      }
      return d;
    }
    default:
      throw Failure("unsupported JSON value");
  }
}

static void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (char32_t c : utf8_decode(s)) {
    char buf[16];
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
          if (c > 0xFFFF) {
            char32_t v = c - 0x10000;
            std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                          static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
          } else {
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          }
          out += buf;
        } else {
          utf8_append(out, c);
        }
    }
  }
  out += '"';
}

static std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return py_float_repr(d);
}

static void json_value(std::string& out, const Value& v, const JsonOptions& o, int depth) {
  using K = Value::Kind;
  check_depth(depth);
  auto newline = [&](int level) {
    if (o.indent < 0) return;
    out += '\n';
    for (int i = 0; i < level; ++i) out += o.indent_str;
  };
  switch (v.kind()) {
    case K::None:
      out += "null";
      return;
    case K::Bool:
      out += v.as_bool() ? "true" : "false";
      return;
    case K::Int:
      out += std::to_string(v.as_int());
      return;
    case K::Float:
      out += json_float(v.as_float());
      return;
    case K::String:
      json_string(out, v.str(), o.ensure_ascii);
      return;
    case K::List:
    case K::Tuple: {
      if (v.items().empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.items().size(); ++i) {
        if (i) out += o.item_sep;
        newline(depth + 1);
        json_value(out, v.items()[i], o, depth + 1);
      }
      newline(depth);
      out += ']';
      return;
    }
    case K::Dict: {
      if (v.dict_ref().entries.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> entries;
      for (const auto& [k, e] : v.dict_ref().entries) {
        std::string key;
        if (k.is_string())
          key = k.str();
        else if (k.is_bool())
          key = k.as_bool() ? "true" : "false";
        else if (k.is_int())
          key = std::to_string(k.as_int());
        else if (k.is_float())
          key = json_float(k.as_float());
        else if (k.is_none())
          key = "null";
        else
          throw Failure("keys must be str, int, float, bool or None, not " + k.type_name());
        entries.emplace_back(std::move(key), &e);
      }
      if (o.sort_keys)
        std::stable_sort(entries.begin(), entries.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      for (size_t i = 0; i < entries.size(); ++i) {
        if (i) out += o.item_sep;
        newline(depth + 1);
        json_string(out, entries[i].first, o.ensure_ascii);
        out += o.key_sep;
        json_value(out, *entries[i].second, o, depth + 1);
      }
      newline(depth);
      out += '}';
      return;
    }
    default:
      throw Failure("Object of type " + v.type_name() + " is not JSON serializable");
  }
}

std::string to_json(const Value& v, const JsonOptions& opts) {
  std::string out;
  json_value(out, v, opts, 0);
  return out;
}

}  // namespace kiln::jinja
