#pragma once
// The values a chat template computes with. They follow Python's data model closely enough that printing, comparing
// and serialising give the bytes jinja2 gives: lists and dicts are shared by reference (namespaces are mutated
// through aliases), ints are 64-bit, floats print with Python's shortest repr, strings are UTF-8.
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "runtime/core/json_limits.h"

namespace kiln::jinja {

// How deeply lists, tuples and dicts may nest, whether they come from JSON (kMaxJsonDepth) or are built by a
// template: printing, serialising and comparing recurse once per level, and so does freeing a value, so a template
// that nests a namespace attribute once per loop iteration must fail instead of overflowing the stack.
inline constexpr int kMaxValueDepth = 2 * kMaxJsonDepth;

// A failure while rendering, without a line number yet; the evaluator adds the line of the failing node.
class Failure : public std::runtime_error {
 public:
  explicit Failure(const std::string& message) : std::runtime_error(message) {}
};

class Value;
using List = std::vector<Value>;
struct Dict;
struct Callable;

class Value {
 public:
  // Namespace also covers jinja2's loop object: both are attribute bags without dict methods.
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Tuple, Dict, Namespace, Callable };

  Value() = default;  // undefined
  static Value undefined(std::string hint);
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value number(double f);
  static Value string(std::string s, bool markup = false);
  static Value list(List items = {});
  static Value tuple(List items);
  static Value dict();
  static Value name_space(std::string type_name = "Namespace");
  static Value function(std::string name, std::function<Value(struct Args&)> fn);

  Kind kind() const { return kind_; }
  // Whether this value is, or holds at any depth, the dict or namespace `target` (values are depth-bounded, so the
  // walk is too).
  bool holds(const Dict* target) const;
  bool is_undefined() const { return kind_ == Kind::Undefined; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_int() const { return kind_ == Kind::Int; }  // not bool
  bool is_float() const { return kind_ == Kind::Float; }
  bool is_number() const { return kind_ == Kind::Int || kind_ == Kind::Float || kind_ == Kind::Bool; }
  bool is_integral() const { return kind_ == Kind::Int || kind_ == Kind::Bool; }  // Python: bool is an int
  bool is_string() const { return kind_ == Kind::String; }
  bool is_sequence() const { return kind_ == Kind::List || kind_ == Kind::Tuple; }
  bool is_dict() const { return kind_ == Kind::Dict; }
  bool is_namespace() const { return kind_ == Kind::Namespace; }
  bool is_callable() const { return kind_ == Kind::Callable; }
  bool is_markup() const { return kind_ == Kind::String && markup_; }

  bool as_bool() const { return b_; }
  int64_t as_int() const { return kind_ == Kind::Bool ? (b_ ? 1 : 0) : i_; }
  double as_float() const { return kind_ == Kind::Float ? f_ : static_cast<double>(as_int()); }
  // String contents, or an undefined's hint (the message jinja2's UndefinedError would carry).
  const std::string& str() const {
    static const std::string empty;
    return s_ ? *s_ : empty;
  }
  List& items() const { return *list_; }
  Dict& dict_ref() const { return *dict_; }
  Callable& callable() const { return *fn_; }
  // Levels of containers: 0 for a scalar, 1 for a list of scalars, 1 + the deepest item otherwise. O(1).
  int depth() const;

  // Python's type name as error messages show it ('str', 'dict object', ...).
  std::string type_name() const;
  bool truthy() const;

 private:
  Kind kind_ = Kind::Undefined;
  bool b_ = false;
  bool markup_ = false;
  uint16_t depth_ = 0;  // lists and tuples (immutable once built); dicts keep theirs in Dict::depth
  int64_t i_ = 0;
  double f_ = 0;
  std::shared_ptr<const std::string> s_;
  std::shared_ptr<List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Callable> fn_;
};

// Insertion-ordered, like Python's dict. Linear lookup: template dicts are small.
struct Dict {
  std::vector<std::pair<Value, Value>> entries;
  std::string type_name = "dict";  // Namespace / LoopContext for attribute bags
  int depth = 0;                   // the deepest key or value held (Value::depth); set() keeps it
  const Value* find(const Value& key) const;
  const Value* find(const std::string& key) const;
  void set(const Value& key, Value value);
  void set(const std::string& key, Value value) { set(Value::string(key), std::move(value)); }
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // Positional or keyword argument `index`/`name`, else `fallback`; errors on unknown keywords are the caller's job.
  Value get(size_t index, const char* name, Value fallback = Value()) const;
  bool has(size_t index, const char* name) const;
  // Throws when more than `max_pos` positionals or a keyword outside `names` was given.
  void check(const char* fn, size_t max_pos, std::initializer_list<const char*> names) const;
};

struct Callable {
  std::string name;
  std::function<Value(Args&)> fn;
};

// Python semantics. The recursive ones throw Failure past kMaxValueDepth levels (a namespace can hold itself).
bool equals(const Value& a, const Value& b, int depth = 0);
int compare(const Value& a, const Value& b, const char* op, int depth = 0);  // <0, 0, >0; Failure if unorderable
std::string to_str(const Value& v, int depth = 0);                           // str(v)
std::string repr(const Value& v, int depth = 0);                             // repr(v)
std::string py_float_repr(double d);
std::string py_str_repr(const std::string& s);
// Throws Failure for documents nested deeper than kMaxJsonDepth.
Value from_json(const nlohmann::ordered_json& j, int depth = 0);

struct JsonOptions {
  int indent = -1;  // -1: None
  std::string indent_str;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;
};
// json.dumps(v, ...) as transformers' tojson filter calls it.
std::string to_json(const Value& v, const JsonOptions& opts);

}  // namespace kiln::jinja
