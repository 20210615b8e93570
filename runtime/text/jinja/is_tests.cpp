// jinja2's built-in tests (`x is defined`, `n is divisibleby 3`, ...).
#include "runtime/text/jinja/eval.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {
namespace {

bool all_cased(const std::string& s, bool upper) {
  bool any = false;
  for (char32_t c : utf8_decode(s)) {
    if (!is_cased(c)) continue;
    any = true;
    if (upper ? !is_upper(c) : !is_lower(c)) return false;
  }
  return any;
}

int64_t py_mod_is_zero(const Value& v, const Value& m) {
  Value r = binary_op("%", v, m);
  return equals(r, Value::integer(0)) ? 0 : 1;
}

}  // namespace

bool apply_test(const std::string& name, const Value& v, Args& a) {
  auto arg = [&]() {
    if (a.pos.empty()) throw Failure("test '" + name + "' needs an argument");
    return a.pos[0];
  };
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  // Undefined is iterable, sized and callable in jinja2 (it defines __iter__, __len__, __getitem__, __call__).
  if (name == "iterable" || name == "sequence")
    return v.is_undefined() || v.is_string() || v.is_sequence() || v.is_dict();
  if (name == "callable") return v.is_callable() || v.is_undefined();
  if (name == "escaped") return v.is_markup();
  if (name == "lower") return all_cased(to_str(v), false);
  if (name == "upper") return all_cased(to_str(v), true);
  if (name == "odd" || name == "even") {
    Value r = binary_op("%", v, Value::integer(2));
    return equals(r, Value::integer(name == "odd" ? 1 : 0));
  }
  if (name == "divisibleby") return py_mod_is_zero(v, arg()) == 0;
  if (name == "in") return contains(arg(), v);
  if (name == "eq" || name == "equalto" || name == "==") return equals(v, arg());
  if (name == "ne" || name == "!=") return !equals(v, arg());
  if (name == "lt" || name == "lessthan" || name == "<") return compare(v, arg(), "<") < 0;
  if (name == "le" || name == "<=") return compare(v, arg(), "<=") <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return compare(v, arg(), ">") > 0;
  if (name == "ge" || name == ">=") return compare(v, arg(), ">=") >= 0;
  if (name == "sameas") {
    // Identity is only well defined for the singletons; anything else depends on CPython's object caching.
    Value other = arg();
    if (v.is_none() || other.is_none()) return v.is_none() && other.is_none();
    if (v.is_bool() || other.is_bool()) return v.is_bool() && other.is_bool() && v.as_bool() == other.as_bool();
    throw Failure("'sameas' is only supported for none, true and false");
  }
  throw Failure("unsupported test '" + name + "'");
}

}  // namespace kiln::jinja
