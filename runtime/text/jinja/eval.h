#pragma once
// The interpreter's internals, shared by the evaluator, the filters, the tests and the Python methods. Semantics
// follow jinja2's ImmutableSandboxedEnvironment with default Undefined, as transformers configures it.
#include <memory>
#include <string>
#include <unordered_map>

#include "runtime/text/jinja/ast.h"
#include "runtime/text/jinja/value.h"

namespace kiln::jinja {

struct Scope {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;
  const Value* lookup(const std::string& name) const;
};
using ScopePtr = std::shared_ptr<Scope>;

// obj.name and obj[key], with jinja2's fallbacks between attributes and items.
Value get_attr(const Value& obj, const std::string& name);
Value get_item(const Value& obj, const Value& key);
// A Python method of a str/dict/list value, or an undefined when it has none of that name.
Value bound_method(const Value& obj, const std::string& name);
Value call_value(const Value& fn, Args& args);

// Python's operators and protocols.
Value binary_op(const std::string& op, const Value& a, const Value& b);
bool contains(const Value& container, const Value& item);
List iterate(const Value& v);  // iter(v) materialised; undefined iterates as empty
int64_t length(const Value& v);
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step);
[[noreturn]] void fail_undefined(const Value& v);  // raises the UndefinedError jinja2 would

// Python's `fmt % args`.
std::string percent_format(const std::string& fmt, const List& args);

Value apply_filter(const std::string& name, const Value& subject, Args& args);
bool apply_test(const std::string& name, const Value& subject, Args& args);

// Globals every template sees (range, dict, namespace, cycler, joiner).
void add_builtin_globals(Scope& scope);

}  // namespace kiln::jinja
