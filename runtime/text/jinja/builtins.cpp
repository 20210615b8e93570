// Globals: jinja2's range/joiner and transformers' dict()/namespace() (the latter refuses underscore names).
#include "runtime/text/jinja/eval.h"

namespace kiln::jinja {
namespace {

constexpr int64_t kMaxRange = 100000;  // jinja2's sandbox limit

Value range_fn(Args& a) {
  a.check("range", 3, {});
  for (const Value& v : a.pos)
    if (!v.is_integral()) throw Failure("'" + v.type_name() + "' object cannot be interpreted as an integer");
  int64_t start = 0, stop = 0, step = 1;
  if (a.pos.size() == 1) {
    stop = a.pos[0].as_int();
  } else if (a.pos.size() >= 2) {
    start = a.pos[0].as_int();
    stop = a.pos[1].as_int();
    if (a.pos.size() == 3) step = a.pos[2].as_int();
  } else {
    throw Failure("range expected at least 1 argument, got 0");
  }
  if (step == 0) throw Failure("range() arg 3 must not be zero");
  List out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
    if (static_cast<int64_t>(out.size()) >= kMaxRange)
      throw Failure("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
    out.push_back(Value::integer(i));
  }
  return Value::list(std::move(out));
}

// dict(*args, **kwargs) into `out`, as Python's dict constructor fills it.
void fill_dict(Dict& out, Args& a, const char* fn) {
  if (a.pos.size() > 1)
    throw Failure(std::string(fn) + " expected at most 1 argument, got " + std::to_string(a.pos.size()));
  if (!a.pos.empty()) {
    const Value& src = a.pos[0];
    if (src.is_dict() || src.is_namespace()) {
      for (const auto& [k, v] : src.dict_ref().entries) out.set(k, v);
    } else {
      for (const Value& pair : iterate(src)) {
        if (!pair.is_sequence() || pair.items().size() != 2)
          throw Failure("dictionary update sequence element has wrong length; 2 is required");
        out.set(pair.items()[0], pair.items()[1]);
      }
    }
  }
  for (const auto& [k, v] : a.kw) out.set(k, v);
}

}  // namespace

void add_builtin_globals(Scope& scope) {
  scope.vars["range"] = Value::function("range", range_fn);
  scope.vars["dict"] = Value::function("dict", [](Args& a) {
    Value d = Value::dict();
    fill_dict(d.dict_ref(), a, "dict");
    return d;
  });
  scope.vars["namespace"] = Value::function("namespace", [](Args& a) {
    Value ns = Value::name_space();
    fill_dict(ns.dict_ref(), a, "namespace");
    for (const auto& [k, v] : ns.dict_ref().entries)
      if (k.is_string() && !k.str().empty() && k.str()[0] == '_')
        throw Failure("Chat templates cannot store underscore-prefixed attributes on a namespace, but got " + repr(k) +
                      ". Please rename the attribute.");
    return ns;
  });
  scope.vars["joiner"] = Value::function("joiner", [](Args& a) {
    a.check("joiner", 1, {"sep"});
    std::string sep = to_str(a.get(0, "sep", Value::string(", ")));
    auto used = std::make_shared<bool>(false);
    return Value::function("joiner", [sep, used](Args&) {
      if (!*used) {
        *used = true;
        return Value::string("");
      }
      return Value::string(sep);
    });
  });
}

}  // namespace kiln::jinja
