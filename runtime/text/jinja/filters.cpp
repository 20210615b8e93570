// jinja2's built-in filters, plus transformers' tojson. Filters that jinja2 returns as generators (map, select,
// reverse, ...) return lists here: chat templates consume them with join/list/first/for, which gives the same bytes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "runtime/text/jinja/eval.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {
namespace {

// jinja2's make_attrgetter: "a.b.0" walks getitem (which falls back to attributes) one part at a time.
Value get_path(const Value& item, const Value& attribute, const Value& dflt = Value::none()) {
  if (attribute.is_none() || attribute.is_undefined()) return item;
  std::vector<Value> parts;
  if (attribute.is_integral()) {
    parts.push_back(attribute);
  } else {
    std::string a = to_str(attribute);
    size_t start = 0;
    while (true) {
      size_t dot = a.find('.', start);
      std::string part = a.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      parts.push_back(digits ? Value::integer(std::stoll(part)) : Value::string(part));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  }
  Value v = item;
  for (const Value& p : parts) {
    v = get_item(v, p);
    if (!dflt.is_none() && v.is_undefined()) v = dflt;
  }
  return v;
}

Value ignore_case(const Value& v) { return v.is_string() ? Value::string(py_lower(v.str())) : v; }

std::string soft_str(const Value& v) { return to_str(v); }

Value str_value(std::string s) { return Value::string(std::move(s)); }

// jinja2's do_title: capitalises after runs of whitespace, '-', '(', '{', '[' or '<', not after apostrophes.
std::string jinja_title(const std::string& s) {
  std::u32string cps = utf8_decode(s), out;
  bool word_start = true;
  for (char32_t c : cps) {
    bool sep = is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      out.push_back(c);
      word_start = true;
    } else {
      out.push_back(word_start ? to_upper(c) : to_lower(c));
      word_start = false;
    }
  }
  return utf8_encode(out);
}

std::string jinja_indent(std::string s, const Value& width, bool first, bool blank) {
  std::string ind =
      width.is_string() ? width.str() : std::string(static_cast<size_t>(std::max<int64_t>(0, width.as_int())), ' ');
  s += "\n";
  std::vector<std::string> lines = py_splitlines(s, false);
  std::string rv;
  if (blank) {
    for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + ind : "") + lines[i];
  } else {
    rv = lines.empty() ? "" : lines[0];
    if (lines.size() > 1) {
      rv += "\n";
      for (size_t i = 1; i < lines.size(); ++i) {
        if (i > 1) rv += "\n";
        rv += lines[i].empty() ? lines[i] : ind + lines[i];
      }
    }
  }
  return first ? ind + rv : rv;
}

Value do_round(const Value& v, int64_t precision, const std::string& method) {
  if (!v.is_number()) throw Failure("type " + v.type_name() + " doesn't define __round__ method");
  if (method == "common") {
    if (v.is_integral() && precision >= 0) return Value::integer(v.as_int());
    if (precision > 300) return Value::number(v.as_float());
    if (precision >= 0) {
      char buf[512];
      std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(precision), v.as_float());
      return Value::number(std::strtod(buf, nullptr));
    }
    double p = std::pow(10.0, static_cast<double>(-precision));
    double r = std::nearbyint(v.as_float() / p) * p;
    return v.is_integral() ? Value::integer(static_cast<int64_t>(r)) : Value::number(r);
  }
  if (method != "ceil" && method != "floor") throw Failure("method must be common, ceil or floor");
  double p = std::pow(10.0, static_cast<double>(precision));
  double x = v.as_float() * p;
  return Value::number((method == "ceil" ? std::ceil(x) : std::floor(x)) / p);
}

Value to_int(const Value& v, const Value& dflt, int base) {
  if (v.is_integral()) return Value::integer(v.as_int());
  if (v.is_float()) {
    double f = v.as_float();
    if (!std::isfinite(f)) throw Failure("cannot convert float infinity or NaN to integer");
    return Value::integer(static_cast<int64_t>(f));
  }
  if (v.is_string()) {
    std::string s = py_strip(v.str(), nullptr, true, true), digits;
    for (char c : s)
      if (c != '_') digits += c;
    char* end = nullptr;
    errno = 0;
    long long i = std::strtoll(digits.c_str(), &end, base);
    if (!digits.empty() && end && *end == '\0' && errno == 0) return Value::integer(i);
    // jinja2 retries int(float(s)) so that "42.5"|int is 42; Python's float() knows no hex.
    end = nullptr;
    double f = std::strtod(digits.c_str(), &end);
    bool hex = digits.find_first_of("xX") != std::string::npos;
    if (!digits.empty() && !hex && end && *end == '\0' && std::isfinite(f))
      return Value::integer(static_cast<int64_t>(f));
  }
  return dflt;
}

Value to_float(const Value& v, const Value& dflt) {
  if (v.is_number()) return Value::number(v.as_float());
  if (v.is_string()) {
    std::string s = py_strip(v.str(), nullptr, true, true);
    char* end = nullptr;
    double f = std::strtod(s.c_str(), &end);
    bool hex = s.find_first_of("xX") != std::string::npos;
    if (!s.empty() && end && *end == '\0' && !hex) return Value::number(f);
  }
  return dflt;
}

Value tojson(const Value& v, Args& a) {
  a.check("tojson", 4, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonOptions o;
  o.ensure_ascii = a.get(0, "ensure_ascii", Value::boolean(false)).truthy();
  Value indent = a.get(1, "indent", Value::none());
  if (indent.is_string()) {
    o.indent = 1;
    o.indent_str = indent.str();
  } else if (indent.is_integral()) {
    o.indent = 1;
    o.indent_str = std::string(static_cast<size_t>(std::max<int64_t>(0, indent.as_int())), ' ');
  } else if (!indent.is_none()) {
    throw Failure("tojson indent must be an int or a string");
  }
  Value seps = a.get(2, "separators", Value::none());
  if (seps.is_sequence() && seps.items().size() == 2 && seps.items()[0].is_string() && seps.items()[1].is_string()) {
    o.item_sep = seps.items()[0].str();
    o.key_sep = seps.items()[1].str();
  } else if (!seps.is_none()) {
    throw Failure("tojson separators must be a pair of strings");
  } else if (o.indent >= 0) {
    o.item_sep = ",";
  }
  o.sort_keys = a.get(3, "sort_keys", Value::boolean(false)).truthy();
  return str_value(to_json(v, o));
}

// select/reject/selectattr/rejectattr share jinja2's select_or_reject.
Value select_filter(const Value& seq, Args& a, bool with_attr, bool want) {
  size_t first = with_attr ? 1 : 0;
  Value attr = with_attr ? a.get(0, nullptr) : Value::none();
  List out;
  if (!seq.truthy()) return Value::list();
  for (const Value& item : iterate(seq)) {
    Value subject = with_attr ? get_path(item, attr) : item;
    bool ok;
    if (a.pos.size() > first) {
      Args targs;
      targs.pos.assign(a.pos.begin() + static_cast<long>(first) + 1, a.pos.end());
      targs.kw = a.kw;
      if (!a.pos[first].is_string()) throw Failure("test name must be a string");
      ok = apply_test(a.pos[first].str(), subject, targs);
    } else {
      ok = subject.truthy();
    }
    if (ok == want) out.push_back(item);
  }
  return Value::list(std::move(out));
}

Value sort_filter(const Value& seq, Args& a) {
  a.check("sort", 3, {"reverse", "case_sensitive", "attribute"});
  bool reverse = a.get(0, "reverse").truthy();
  bool case_sensitive = a.get(1, "case_sensitive").truthy();
  Value attr = a.get(2, "attribute", Value::none());
  std::vector<Value> attrs;
  if (attr.is_string() && attr.str().find(',') != std::string::npos) {
    std::string s = attr.str();
    size_t start = 0;
    while (true) {
      size_t comma = s.find(',', start);
      attrs.push_back(Value::string(s.substr(start, comma == std::string::npos ? std::string::npos : comma - start)));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else {
    attrs.push_back(attr);
  }
  List items = iterate(seq);
  std::vector<std::pair<List, Value>> keyed;
  for (const Value& item : items) {
    List key;
    for (const Value& at : attrs) {
      Value k = get_path(item, at);
      key.push_back(case_sensitive ? k : ignore_case(k));
    }
    keyed.emplace_back(std::move(key), item);
  }
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    int c = compare(Value::tuple(x.first), Value::tuple(y.first), "<");
    return reverse ? c > 0 : c < 0;
  });
  List out;
  for (auto& [k, v] : keyed) out.push_back(v);
  return Value::list(std::move(out));
}

Value min_max(const Value& seq, Args& a, bool max) {
  a.check(max ? "max" : "min", 2, {"case_sensitive", "attribute"});
  bool case_sensitive = a.get(0, "case_sensitive").truthy();
  Value attr = a.get(1, "attribute", Value::none());
  List items = iterate(seq);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  auto key = [&](const Value& v) {
    Value k = get_path(v, attr);
    return case_sensitive ? k : ignore_case(k);
  };
  size_t best = 0;
  for (size_t i = 1; i < items.size(); ++i) {
    int c = compare(key(items[i]), key(items[best]), max ? ">" : "<");
    if (max ? c > 0 : c < 0) best = i;
  }
  return items[best];
}

}  // namespace

Value apply_filter(const std::string& name, const Value& v, Args& a) {
  if (name == "tojson") return tojson(v, a);
  if (name == "trim") {
    a.check("trim", 1, {"chars"});
    std::string chars_storage;
    Value chars = a.get(0, "chars", Value::none());
    if (!chars.is_none()) chars_storage = to_str(chars);
    return str_value(py_strip(soft_str(v), chars.is_none() ? nullptr : &chars_storage, true, true));
  }
  if (name == "length" || name == "count") return Value::integer(length(v));
  if (name == "default" || name == "d") {
    a.check(name.c_str(), 2, {"default_value", "boolean"});
    Value dflt = a.get(0, "default_value", Value::string(""));
    bool boolean = a.get(1, "boolean").truthy();
    return v.is_undefined() || (boolean && !v.truthy()) ? dflt : v;
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::list();
    if (!v.is_dict()) throw Failure("Can only get item pairs from a mapping.");
    List out;
    for (const auto& [k, val] : v.dict_ref().entries) out.push_back(Value::tuple({k, val}));
    return Value::list(std::move(out));
  }
  if (name == "join") {
    a.check("join", 2, {"d", "attribute"});
    std::string sep = to_str(a.get(0, "d", Value::string("")));
    Value attr = a.get(1, "attribute", Value::none());
    std::string out;
    List items = iterate(v);
    for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + to_str(get_path(items[i], attr));
    return str_value(std::move(out));
  }
  if (name == "replace") {
    a.check("replace", 3, {"old", "new", "count"});
    Value count = a.get(2, "count", Value::none());
    return str_value(py_replace(soft_str(v), to_str(a.get(0, "old")), to_str(a.get(1, "new")),
                                count.is_none() ? -1 : static_cast<long>(count.as_int())));
  }
  if (name == "upper") return str_value(py_upper(soft_str(v)));
  if (name == "lower") return str_value(py_lower(soft_str(v)));
  if (name == "title") return str_value(jinja_title(soft_str(v)));
  if (name == "capitalize") return str_value(py_capitalize(soft_str(v)));
  if (name == "string") return v.is_string() ? v : str_value(soft_str(v));
  if (name == "safe") return Value::string(soft_str(v), true);
  if (name == "escape" || name == "e") {
    if (v.is_markup()) return v;
    return Value::string(binary_op("+", Value::string("", true), Value::string(soft_str(v))).str(), true);
  }
  if (name == "first") {
    List items = iterate(v);
    return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
  }
  if (name == "last") {
    if (v.is_undefined()) throw Failure("'Undefined' object is not reversible");
    List items = iterate(v);
    return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
  }
  if (name == "list") return Value::list(iterate(v));
  if (name == "int") {
    a.check("int", 2, {"default", "base"});
    return to_int(v, a.get(0, "default", Value::integer(0)),
                  static_cast<int>(a.get(1, "base", Value::integer(10)).as_int()));
  }
  if (name == "float") {
    a.check("float", 1, {"default"});
    return to_float(v, a.get(0, "default", Value::number(0.0)));
  }
  if (name == "abs") {
    if (v.is_float()) return Value::number(std::fabs(v.as_float()));
    if (v.is_integral()) return Value::integer(v.as_int() < 0 ? -v.as_int() : v.as_int());
    throw Failure("bad operand type for abs(): '" + v.type_name() + "'");
  }
  if (name == "round") {
    a.check("round", 2, {"precision", "method"});
    return do_round(v, a.get(0, "precision", Value::integer(0)).as_int(),
                    to_str(a.get(1, "method", Value::string("common"))));
  }
  if (name == "map") {
    List out;
    if (!v.truthy()) return Value::list();
    if (a.pos.empty()) {
      a.check("map", 0, {"attribute", "default"});
      Value attr = a.get(0, "attribute"), dflt = a.get(1, "default", Value::none());
      if (attr.is_undefined()) throw Failure("map requires a filter name or attribute=");
      for (const Value& item : iterate(v)) out.push_back(get_path(item, attr, dflt));
    } else {
      if (!a.pos[0].is_string()) throw Failure("map filter name must be a string");
      Args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (const Value& item : iterate(v)) {
        Args copy = rest;
        out.push_back(apply_filter(a.pos[0].str(), item, copy));
      }
    }
    return Value::list(std::move(out));
  }
  if (name == "select") return select_filter(v, a, false, true);
  if (name == "reject") return select_filter(v, a, false, false);
  if (name == "selectattr") return select_filter(v, a, true, true);
  if (name == "rejectattr") return select_filter(v, a, true, false);
  if (name == "unique") {
    a.check("unique", 2, {"case_sensitive", "attribute"});
    bool cs = a.get(0, "case_sensitive").truthy();
    Value attr = a.get(1, "attribute", Value::none());
    List seen, out;
    for (const Value& item : iterate(v)) {
      Value key = get_path(item, attr);
      if (!cs) key = ignore_case(key);
      if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return equals(s, key); })) {
        seen.push_back(key);
        out.push_back(item);
      }
    }
    return Value::list(std::move(out));
  }
  if (name == "sort") return sort_filter(v, a);
  if (name == "dictsort") {
    a.check("dictsort", 3, {"case_sensitive", "by", "reverse"});
    bool cs = a.get(0, "case_sensitive").truthy();
    std::string by = to_str(a.get(1, "by", Value::string("key")));
    bool reverse = a.get(2, "reverse").truthy();
    if (by != "key" && by != "value") throw Failure("You can only sort by either \"key\" or \"value\"");
    if (!v.is_dict()) throw Failure("dictsort expects a mapping");
    List pairs;
    for (const auto& [k, val] : v.dict_ref().entries) pairs.push_back(Value::tuple({k, val}));
    size_t pos = by == "key" ? 0 : 1;
    std::stable_sort(pairs.begin(), pairs.end(), [&](const Value& x, const Value& y) {
      Value kx = x.items()[pos], ky = y.items()[pos];
      int c = cs ? compare(kx, ky, "<") : compare(ignore_case(kx), ignore_case(ky), "<");
      return reverse ? c > 0 : c < 0;
    });
    return Value::list(std::move(pairs));
  }
  if (name == "indent") {
    a.check("indent", 3, {"width", "first", "blank"});
    return str_value(jinja_indent(soft_str(v), a.get(0, "width", Value::integer(4)), a.get(1, "first").truthy(),
                                  a.get(2, "blank").truthy()));
  }
  if (name == "wordcount") {
    int64_t n = 0;
    bool in_word = false;
    for (char32_t c : utf8_decode(soft_str(v))) {
      bool w = is_word_char(c);
      if (w && !in_word) ++n;
      in_word = w;
    }
    return Value::integer(n);
  }
  if (name == "center") {
    a.check("center", 1, {"width"});
    return str_value(py_center(soft_str(v), static_cast<long>(a.get(0, "width", Value::integer(80)).as_int()), ' '));
  }
  if (name == "batch") {
    a.check("batch", 2, {"linecount", "fill_with"});
    int64_t n = a.get(0, "linecount").as_int();
    if (n <= 0) throw Failure("batch linecount must be positive");
    Value fill = a.get(1, "fill_with", Value::none());
    List out, cur;
    for (const Value& item : iterate(v)) {
      if (static_cast<int64_t>(cur.size()) == n) {
        out.push_back(Value::list(std::move(cur)));
        cur.clear();
      }
      cur.push_back(item);
    }
    if (!cur.empty()) {
      if (!fill.is_none())
        while (static_cast<int64_t>(cur.size()) < n) cur.push_back(fill);
      out.push_back(Value::list(std::move(cur)));
    }
    return Value::list(std::move(out));
  }
  if (name == "reverse") {
    if (v.is_string()) return slice(v, Value::none(), Value::none(), Value::integer(-1));
    List items = iterate(v);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "sum") {
    a.check("sum", 2, {"attribute", "start"});
    Value attr = a.get(0, "attribute", Value::none());
    Value total = a.get(1, "start", Value::integer(0));
    for (const Value& item : iterate(v)) total = binary_op("+", total, get_path(item, attr));
    return total;
  }
  if (name == "min" || name == "max") return min_max(v, a, name == "max");
  if (name == "format") {
    if (!a.kw.empty()) throw Failure("the format filter with keyword arguments is not supported");
    return str_value(percent_format(soft_str(v), a.pos));
  }
  if (name == "attr") {
    a.check("attr", 1, {});
    return get_attr(v, to_str(a.get(0, nullptr)));
  }
  throw Failure("unsupported filter '" + name + "'");
}

}  // namespace kiln::jinja
