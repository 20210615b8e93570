// Python's operators, item/attribute access and iteration, as jinja2's sandbox applies them.
#include <climits>
#include <cmath>

#include "runtime/text/jinja/eval.h"
#include "runtime/text/jinja/unicode.h"

namespace kiln::jinja {
namespace {

constexpr size_t kMaxString = size_t{1} << 28;  // refuse absurd repetition instead of exhausting memory

std::string object_type_repr(const Value& v) { return v.is_none() ? "None" : v.type_name() + " object"; }

Value no_attribute(const Value& obj, const std::string& name) {
  return Value::undefined("'" + object_type_repr(obj) + "' has no attribute '" + name + "'");
}

[[noreturn]] void unsupported_operands(const std::string& op, const Value& a, const Value& b) {
  throw Failure("unsupported operand type(s) for " + op + ": '" + a.type_name() + "' and '" + b.type_name() + "'");
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '\'':
        out += "&#39;";
        break;
      case '"':
        out += "&#34;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

[[noreturn]] void overflow() { throw Failure("integer overflow (kiln's template integers are 64-bit)"); }

Value int_op(char op, int64_t a, int64_t b) {
  int64_t r = 0;
  bool bad = op == '+'   ? __builtin_add_overflow(a, b, &r)
             : op == '-' ? __builtin_sub_overflow(a, b, &r)
                         : __builtin_mul_overflow(a, b, &r);
  if (bad) overflow();
  return Value::integer(r);
}

// Python's float divmod: the floor quotient and a remainder with the divisor's sign.
std::pair<double, double> float_divmod(double a, double b, const char* what) {
  if (b == 0) throw Failure(std::string("float ") + what + " by zero");
  double mod = std::fmod(a, b);
  double div = (a - mod) / b;
  if (mod != 0) {
    if ((b < 0) != (mod < 0)) {
      mod += b;
      div -= 1.0;
    }
  } else {
    mod = std::copysign(0.0, b);
  }
  double floordiv;
  if (div != 0) {
    floordiv = std::floor(div);
    if (div - floordiv > 0.5) floordiv += 1.0;
  } else {
    floordiv = std::copysign(0.0, a / b);
  }
  return {floordiv, mod};
}

Value repeat(const List& items, int64_t n, bool tuple) {
  List out;
  if (n > 0 && items.size() * static_cast<size_t>(n) > kMaxString) throw Failure("repetition result too large");
  for (int64_t i = 0; i < n; ++i) out.insert(out.end(), items.begin(), items.end());
  return tuple ? Value::tuple(std::move(out)) : Value::list(std::move(out));
}

Value repeat(const std::string& s, int64_t n) {
  std::string out;
  if (n > 0 && s.size() * static_cast<size_t>(n) > kMaxString) throw Failure("repetition result too large");
  for (int64_t i = 0; i < n; ++i) out += s;
  return Value::string(std::move(out));
}

int64_t py_index(const Value& v) {
  if (v.is_integral()) return v.as_int();
  throw Failure("slice indices must be integers or None or have an __index__ method");
}

}  // namespace

void fail_undefined(const Value& v) { throw Failure(v.str().empty() ? "value is undefined" : v.str()); }

Value get_attr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (!name.empty() && name[0] == '_')
    return Value::undefined("access to attribute '" + name + "' of '" + obj.type_name() + "' object is unsafe.");
  if (obj.is_string() || obj.is_sequence() || obj.is_dict()) {
    Value m = bound_method(obj, name);
    if (!m.is_undefined() || !m.str().empty()) return m;  // a method, or the sandbox's refusal of a mutating one
  }
  if (obj.is_dict() || obj.is_namespace()) {
    if (const Value* v = obj.dict_ref().find(name)) return *v;
  }
  return no_attribute(obj, name);
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (obj.is_sequence() && key.is_integral()) {
    int64_t n = static_cast<int64_t>(obj.items().size()), i = key.as_int();
    if (i < 0) i += n;
    if (i >= 0 && i < n) return obj.items()[static_cast<size_t>(i)];
  } else if (obj.is_string() && key.is_integral()) {
    std::u32string cps = utf8_decode(obj.str());
    int64_t n = static_cast<int64_t>(cps.size()), i = key.as_int();
    if (i < 0) i += n;
    if (i >= 0 && i < n) return Value::string(utf8_encode(cps.substr(static_cast<size_t>(i), 1)));
  } else if (obj.is_dict()) {
    if (const Value* v = obj.dict_ref().find(key)) return *v;
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return Value::undefined("'" + object_type_repr(obj) + "' has no element " + repr(key));
}

Value call_value(const Value& fn, Args& args) {
  if (fn.is_undefined()) fail_undefined(fn);
  if (!fn.is_callable()) throw Failure("'" + fn.type_name() + "' object is not callable");
  return fn.callable().fn(args);
}

Value binary_op(const std::string& op, const Value& a, const Value& b) {
  if (op == "~") return Value::string(to_str(a) + to_str(b));
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  const bool ints = a.is_integral() && b.is_integral();
  const bool nums = a.is_number() && b.is_number();
  if (op == "+") {
    if (ints) return int_op('+', a.as_int(), b.as_int());
    if (nums) return Value::number(a.as_float() + b.as_float());
    if (a.is_string() && b.is_string()) {
      // markupsafe: a safe string escapes the plain one it is joined with.
      if (a.is_markup() && !b.is_markup()) return Value::string(a.str() + html_escape(b.str()), true);
      if (b.is_markup() && !a.is_markup()) return Value::string(html_escape(a.str()) + b.str(), true);
      if (a.str().size() + b.str().size() > kMaxString) throw Failure("string too large");
      return Value::string(a.str() + b.str(), a.is_markup());
    }
    if (a.kind() == b.kind() && a.is_sequence()) {
      List out = a.items();
      out.insert(out.end(), b.items().begin(), b.items().end());
      return a.kind() == Value::Kind::Tuple ? Value::tuple(std::move(out)) : Value::list(std::move(out));
    }
    if (a.is_string() || a.kind() == Value::Kind::List || a.kind() == Value::Kind::Tuple)
      throw Failure("can only concatenate " + a.type_name() + " (not \"" + b.type_name() + "\") to " + a.type_name());
    unsupported_operands(op, a, b);
  }
  if (op == "-") {
    if (ints) return int_op('-', a.as_int(), b.as_int());
    if (nums) return Value::number(a.as_float() - b.as_float());
    unsupported_operands(op, a, b);
  }
  if (op == "*") {
    if (ints) return int_op('*', a.as_int(), b.as_int());
    if (nums) return Value::number(a.as_float() * b.as_float());
    if (a.is_string() && b.is_integral()) return repeat(a.str(), b.as_int());
    if (b.is_string() && a.is_integral()) return repeat(b.str(), a.as_int());
    if (a.is_sequence() && b.is_integral()) return repeat(a.items(), b.as_int(), a.kind() == Value::Kind::Tuple);
    if (b.is_sequence() && a.is_integral()) return repeat(b.items(), a.as_int(), b.kind() == Value::Kind::Tuple);
    throw Failure("can't multiply sequence by non-int of type '" + b.type_name() + "'");
  }
  if (op == "/") {
    if (!nums) unsupported_operands(op, a, b);
    if (b.as_float() == 0) throw Failure(ints ? "division by zero" : "float division by zero");
    return Value::number(a.as_float() / b.as_float());
  }
  if (op == "//" || op == "%") {
    if (!nums) {
      if (op == "%" && a.is_string())
        return Value::string(percent_format(a.str(), b.kind() == Value::Kind::Tuple ? b.items() : List{b}));
      unsupported_operands(op, a, b);
    }
    if (ints) {
      int64_t x = a.as_int(), y = b.as_int();
      if (y == 0) throw Failure("integer division or modulo by zero");
      if (x == INT64_MIN && y == -1) throw Failure("integer overflow");
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) {
        q -= 1;
        m += y;
      }
      return Value::integer(op == "//" ? q : m);
    }
    auto [q, m] = float_divmod(a.as_float(), b.as_float(), op == "//" ? "floor division" : "modulo");
    return Value::number(op == "//" ? q : m);
  }
  if (op == "**") {
    if (!nums) unsupported_operands("** or pow()", a, b);
    if (ints && b.as_int() >= 0) {
      int64_t base = a.as_int(), e = b.as_int(), result = 1;
      while (e > 0) {
        if (e & 1) {
          if (__builtin_mul_overflow(result, base, &result)) overflow();
        }
        e >>= 1;
        if (e > 0 && __builtin_mul_overflow(base, base, &base)) overflow();
      }
      return Value::integer(result);
    }
    double x = a.as_float(), y = b.as_float();
    if (x == 0 && y < 0) throw Failure("0.0 cannot be raised to a negative power");
    if (x < 0 && std::floor(y) != y) throw Failure("complex results of ** are not supported");
    return Value::number(std::pow(x, y));
  }
  throw Failure("unknown operator " + op);
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::Undefined:
      return false;
    case Value::Kind::String:
      if (!item.is_string()) throw Failure("'in <string>' requires string as left operand, not " + item.type_name());
      return container.str().find(item.str()) != std::string::npos;
    case Value::Kind::List:
    case Value::Kind::Tuple:
      for (const Value& v : container.items())
        if (equals(v, item)) return true;
      return false;
    case Value::Kind::Dict:
      return container.dict_ref().find(item) != nullptr;
    default:
      throw Failure("argument of type '" + container.type_name() + "' is not iterable");
  }
}

List iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return {};
    case Value::Kind::List:
    case Value::Kind::Tuple:
      return v.items();
    case Value::Kind::String: {
      List out;
      for (char32_t c : utf8_decode(v.str())) out.push_back(Value::string(utf8_encode(std::u32string(1, c))));
      return out;
    }
    case Value::Kind::Dict: {
      List out;
      for (const auto& [k, val] : v.dict_ref().entries) out.push_back(k);
      return out;
    }
    default:
      throw Failure("'" + v.type_name() + "' object is not iterable");
  }
}

int64_t length(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Undefined:
      return 0;
    case Value::Kind::String:
      return static_cast<int64_t>(utf8_length(v.str()));
    case Value::Kind::List:
    case Value::Kind::Tuple:
      return static_cast<int64_t>(v.items().size());
    case Value::Kind::Dict:
      return static_cast<int64_t>(v.dict_ref().entries.size());
    default:
      throw Failure("object of type '" + v.type_name() + "' has no len()");
  }
}

Value slice(const Value& obj, const Value& start_v, const Value& stop_v, const Value& step_v) {
  int64_t step = step_v.is_none() ? 1 : py_index(step_v);
  if (step == 0) throw Failure("slice step cannot be zero");
  if (!obj.is_string() && !obj.is_sequence())
    return Value::undefined("'" + object_type_repr(obj) + "' is not sliceable");
  std::u32string cps;
  int64_t n;
  if (obj.is_string()) {
    cps = utf8_decode(obj.str());
    n = static_cast<int64_t>(cps.size());
  } else {
    n = static_cast<int64_t>(obj.items().size());
  }
  auto adjust = [&](const Value& v, int64_t dflt) {
    if (v.is_none()) return dflt;
    int64_t i = py_index(v);
    if (i < 0) {
      i += n;
      if (i < 0) i = step < 0 ? -1 : 0;
    } else if (i >= n) {
      i = step < 0 ? n - 1 : n;
    }
    return i;
  };
  int64_t start = adjust(start_v, step < 0 ? n - 1 : 0);
  int64_t stop = adjust(stop_v, step < 0 ? -1 : n);
  std::vector<int64_t> idx;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) idx.push_back(i);
  if (obj.is_string()) {
    std::u32string out;
    for (int64_t i : idx) out.push_back(cps[static_cast<size_t>(i)]);
    return Value::string(utf8_encode(out));
  }
  List out;
  for (int64_t i : idx) out.push_back(obj.items()[static_cast<size_t>(i)]);
  return obj.kind() == Value::Kind::Tuple ? Value::tuple(std::move(out)) : Value::list(std::move(out));
}

}  // namespace kiln::jinja
