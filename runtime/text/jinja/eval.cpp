// Statement execution and expression evaluation. Scoping follows jinja2: `for` iterations, macro calls and `with`
// blocks get a fresh scope (so `set` inside them does not leak out, which is why templates use namespace()), while
// `if` does not.
#include "runtime/text/jinja/eval.h"

#include "runtime/core/error.h"
#include "runtime/text/jinja/jinja.h"

namespace kiln::jinja {

const Value* Scope::lookup(const std::string& name) const {
  for (const Scope* s = this; s; s = s->parent.get()) {
    auto it = s->vars.find(name);
    if (it != s->vars.end()) return &it->second;
  }
  return nullptr;
}

namespace {

enum class Flow { Normal, Break, Continue };

// Nested evaluations (expressions within expressions, statements within statements, macro calls within them) at
// once. The parser bounds how deep one template's syntax nests, but macros multiply that; this bounds the product,
// so rendering never runs off the stack (jinja2 meets Python's recursion limit of 1000 frames similarly).
constexpr int kMaxNesting = 400;

ScopePtr child(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

class Evaluator {
 public:
  Flow exec(const Body& body, const ScopePtr& scope, std::string& out) {
    for (const auto& s : body) {
      Flow f = exec(*s, scope, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    Nested nested(*this, e.line);
    try {
      return eval_inner(e, scope);
    } catch (const Failure& f) {
      throw Error("chat template line " + std::to_string(e.line) + ": " + f.what());
    }
  }

 private:
  struct Nested {
    Evaluator& ev;
    Nested(Evaluator& evaluator, int line) : ev(evaluator) {
      if (++ev.nesting_ > kMaxNesting) {
        --ev.nesting_;
        throw Error("chat template line " + std::to_string(line) + ": expressions, statements and macro calls nested " +
                    "deeper than " + std::to_string(kMaxNesting) + " levels");
      }
    }
    ~Nested() { --ev.nesting_; }
  };

  Flow exec(const Stmt& s, const ScopePtr& scope, std::string& out) {
    Nested nested(*this, s.line);
    using K = Stmt::Kind;
    switch (s.kind) {
      case K::Data:
        out += s.text;
        return Flow::Normal;
      case K::Output: {
        Value v = eval(*s.exprs[0], scope);
        out += guarded(s.line, [&] { return to_str(v); });
        return Flow::Normal;
      }
      case K::If:
        for (size_t i = 0; i < s.exprs.size(); ++i)
          if (eval(*s.exprs[i], scope).truthy()) return exec(s.bodies[i], scope, out);
        if (s.bodies.size() > s.exprs.size()) return exec(s.bodies.back(), scope, out);
        return Flow::Normal;
      case K::For:
        return exec_for(s, scope, out);
      case K::Set:
        exec_set(s, scope);
        return Flow::Normal;
      case K::SetBlock: {
        std::string text;
        exec(s.bodies[0], scope, text);
        scope->vars[s.targets[0]] = pipe(s, Value::string(std::move(text)), scope);
        return Flow::Normal;
      }
      case K::FilterBlock: {
        std::string text;
        exec(s.bodies[0], scope, text);
        out += guarded(s.line, [&] { return to_str(pipe(s, Value::string(std::move(text)), scope)); });
        return Flow::Normal;
      }
      case K::Macro:
        scope->vars[s.name] = make_macro(s, scope);
        return Flow::Normal;
      case K::CallBlock: {
        const Expr& call = *s.exprs[0];
        Value caller = make_macro(s, scope);
        Value fn = eval(*call.args[0], scope);
        Args args = eval_args(call, scope);
        args.kw.emplace_back("caller", caller);
        Value result = guarded(s.line, [&] { return call_value(fn, args); });
        out += guarded(s.line, [&] { return to_str(result); });
        return Flow::Normal;
      }
      case K::With: {
        ScopePtr inner = child(scope);
        for (const auto& [name, expr] : s.params) inner->vars[name] = eval(*expr, scope);
        return exec(s.bodies[0], inner, out);
      }
      case K::Generation:
        return exec(s.bodies[0], scope, out);
      case K::Break:
        return Flow::Break;
      case K::Continue:
        return Flow::Continue;
    }
    return Flow::Normal;
  }

  template <typename F>
  auto guarded(int line, F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const Failure& e) {
      throw Error("chat template line " + std::to_string(line) + ": " + e.what());
    }
  }

  Value pipe(const Stmt& s, Value v, const ScopePtr& scope) {
    for (const auto& f : s.exprs) {
      Args args = eval_args(*f, scope);
      v = guarded(f->line, [&] { return apply_filter(f->name, v, args); });
    }
    return v;
  }

  void assign(const std::vector<std::string>& targets, const Value& v, Scope& scope, int line) {
    if (targets.size() == 1) {
      scope.vars[targets[0]] = v;
      return;
    }
    List items = guarded(line, [&] { return iterate(v); });
    if (items.size() != targets.size())
      throw Error("chat template line " + std::to_string(line) + ": " +
                  (items.size() > targets.size() ? "too many values to unpack (expected "
                                                 : "not enough values to unpack (expected ") +
                  std::to_string(targets.size()) + ", got " + std::to_string(items.size()) + ")");
    for (size_t i = 0; i < targets.size(); ++i) scope.vars[targets[i]] = items[i];
  }

  void exec_set(const Stmt& s, const ScopePtr& scope) {
    Value v = eval(*s.exprs[0], scope);
    if (s.name.empty()) {
      assign(s.targets, v, *scope, s.line);
      return;
    }
    const Value* ns = scope->lookup(s.targets[0]);
    if (!ns || !ns->is_namespace() || ns->dict_ref().type_name != "Namespace")
      throw Error("chat template line " + std::to_string(s.line) + ": can't assign attribute on non-namespace object");
    // The one place a value can grow without bound: an attribute set from itself once per loop iteration.
    if (v.depth() > kMaxValueDepth)
      throw Error("chat template line " + std::to_string(s.line) + ": values nested deeper than " +
                  std::to_string(kMaxValueDepth) + " levels");
    // Namespace attributes are the only mutable state a template has, so refusing a value that holds the namespace
    // rules out every reference cycle, which shared ownership would leak.
    if (v.holds(&ns->dict_ref()))
      throw Error("chat template line " + std::to_string(s.line) + ": namespace attribute '" + s.name +
                  "' would hold its own namespace");
    if (!s.name.empty() && s.name[0] == '_')
      throw Error("chat template line " + std::to_string(s.line) +
                  ": Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" + s.name +
                  "'. Please rename the attribute.");
    ns->dict_ref().set(s.name, v);
  }

  Flow exec_for(const Stmt& s, const ScopePtr& scope, std::string& out) {
    Value seq = eval(*s.exprs[0], scope);
    List items = guarded(s.line, [&] { return iterate(seq); });
    if (s.exprs.size() > 1) {
      // `for x in xs if cond`: the filter sees only the loop variable, not loop.*
      List kept;
      for (const Value& item : items) {
        ScopePtr test_scope = child(scope);
        assign(s.targets, item, *test_scope, s.line);
        if (eval(*s.exprs[1], test_scope).truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(s.bodies[1], scope, out);
    const int64_t n = static_cast<int64_t>(items.size());
    auto last_changed = std::make_shared<std::vector<Value>>();
    for (int64_t i = 0; i < n; ++i) {
      ScopePtr body_scope = child(scope);
      Value loop = Value::name_space("LoopContext");
      Dict& d = loop.dict_ref();
      d.set("index", Value::integer(i + 1));
      d.set("index0", Value::integer(i));
      d.set("revindex", Value::integer(n - i));
      d.set("revindex0", Value::integer(n - i - 1));
      d.set("first", Value::boolean(i == 0));
      d.set("last", Value::boolean(i == n - 1));
      d.set("length", Value::integer(n));
      d.set("depth", Value::integer(1));
      d.set("depth0", Value::integer(0));
      if (i > 0) d.set("previtem", items[i - 1]);
      if (i + 1 < n) d.set("nextitem", items[i + 1]);
      d.set("cycle", Value::function("cycle", [i](Args& a) {
              if (a.pos.empty()) throw Failure("no items for cycling given");
              return a.pos[static_cast<size_t>(i) % a.pos.size()];
            }));
      d.set("changed", Value::function("changed", [last_changed](Args& a) {
              bool same = last_changed->size() == a.pos.size();
              for (size_t k = 0; same && k < a.pos.size(); ++k) same = equals((*last_changed)[k], a.pos[k]);
              if (same) return Value::boolean(false);
              *last_changed = a.pos;
              return Value::boolean(true);
            }));
      body_scope->vars["loop"] = loop;
      assign(s.targets, items[static_cast<size_t>(i)], *body_scope, s.line);
      if (exec(s.bodies[0], body_scope, out) == Flow::Break) break;
    }
    return Flow::Normal;
  }

  Value make_macro(const Stmt& s, const ScopePtr& scope) {
    const Stmt* def = &s;
    std::string name = s.kind == Stmt::Kind::Macro ? s.name : "caller";
    // A weak reference: the macro usually lives in the scope it captures, and a strong one would leak the cycle.
    std::weak_ptr<Scope> weak_scope = scope;
    return Value::function(name, [this, def, weak_scope, name](Args& args) {
      ScopePtr scope = weak_scope.lock();
      if (!scope) throw Failure("macro '" + name + "' called after its scope ended");
      if (++depth_ > 100) {
        --depth_;
        throw Failure("maximum recursion depth exceeded in macro '" + name + "'");
      }
      struct Guard {
        int& d;
        ~Guard() { --d; }
      } guard{depth_};
      ScopePtr local = child(scope);
      const auto& params = def->params;
      if (args.pos.size() > params.size())
        throw Failure("macro '" + name + "' takes not more than " + std::to_string(params.size()) + " argument(s)");
      for (size_t i = 0; i < params.size(); ++i) {
        if (i < args.pos.size()) {
          local->vars[params[i].first] = args.pos[i];
          continue;
        }
        bool found = false;
        for (const auto& [k, v] : args.kw)
          if (k == params[i].first) {
            local->vars[k] = v;
            found = true;
          }
        if (!found)
          local->vars[params[i].first] = params[i].second
                                             ? eval(*params[i].second, local)
                                             : Value::undefined("parameter '" + params[i].first + "' was not provided");
      }
      for (const auto& [k, v] : args.kw) {
        bool known = k == "caller";
        for (const auto& p : params) known = known || p.first == k;
        if (!known) throw Failure("macro '" + name + "' takes no keyword argument '" + k + "'");
        if (k == "caller") local->vars["caller"] = v;
      }
      std::string out;
      exec(def->bodies[0], local, out);
      return Value::string(std::move(out));
    });
  }

  Args eval_args(const Expr& e, const ScopePtr& scope) {
    Args args;
    for (size_t i = 1; i < e.args.size(); ++i) args.pos.push_back(eval(*e.args[i], scope));
    for (const auto& [k, v] : e.kwargs) args.kw.emplace_back(k, eval(*v, scope));
    return args;
  }

  Value eval_inner(const Expr& e, const ScopePtr& scope) {
    using K = Expr::Kind;
    switch (e.kind) {
      case K::Const:
        return e.value;
      case K::Name: {
        const Value* v = scope->lookup(e.name);
        return v ? *v : Value::undefined("'" + e.name + "' is undefined");
      }
      case K::Getattr:
        return get_attr(eval(*e.args[0], scope), e.name);
      case K::Getitem: {
        Value obj = eval(*e.args[0], scope);
        const Expr& idx = *e.args[1];
        if (idx.kind == K::Slice) {
          auto part = [&](size_t i) { return idx.args[i] ? eval(*idx.args[i], scope) : Value::none(); };
          Value a = part(0), b = part(1), c = part(2);
          if (obj.is_undefined()) fail_undefined(obj);
          return slice(obj, a, b, c);
        }
        return get_item(obj, eval(idx, scope));
      }
      case K::Slice:
        throw Failure("unexpected slice");
      case K::List:
      case K::Tuple: {
        List items;
        for (const auto& a : e.args) items.push_back(eval(*a, scope));
        return e.kind == K::List ? Value::list(std::move(items)) : Value::tuple(std::move(items));
      }
      case K::Dict: {
        Value d = Value::dict();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          Value k = eval(*e.args[i], scope);
          if (k.is_sequence() && k.kind() == Value::Kind::List) throw Failure("unhashable type: 'list'");
          if (k.is_dict()) throw Failure("unhashable type: 'dict'");
          d.dict_ref().set(k, eval(*e.args[i + 1], scope));
        }
        return d;
      }
      case K::Unary: {
        Value v = eval(*e.args[0], scope);
        if (v.is_undefined()) fail_undefined(v);
        if (!v.is_number()) throw Failure("bad operand type for unary " + e.name + ": '" + v.type_name() + "'");
        if (e.name == "+") return v.is_float() ? v : Value::integer(v.as_int());
        if (v.is_float()) return Value::number(-v.as_float());
        if (v.as_int() == INT64_MIN) throw Failure("integer overflow");
        return Value::integer(-v.as_int());
      }
      case K::Binary:
        return binary_op(e.name, eval(*e.args[0], scope), eval(*e.args[1], scope));
      case K::Compare: {
        Value left = eval(*e.args[0], scope);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1], scope);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "==")
            ok = equals(left, right);
          else if (op == "!=")
            ok = !equals(left, right);
          else if (op == "in")
            ok = contains(right, left);
          else if (op == "notin")
            ok = !contains(right, left);
          else {
            int c = compare(left, right, op.c_str());
            ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
          }
          if (!ok) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case K::And: {
        Value a = eval(*e.args[0], scope);
        return a.truthy() ? eval(*e.args[1], scope) : a;
      }
      case K::Or: {
        Value a = eval(*e.args[0], scope);
        return a.truthy() ? a : eval(*e.args[1], scope);
      }
      case K::Not:
        return Value::boolean(!eval(*e.args[0], scope).truthy());
      case K::CondExpr:
        if (eval(*e.args[0], scope).truthy()) return eval(*e.args[1], scope);
        if (e.args[2]) return eval(*e.args[2], scope);
        return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                                " evaluated to false and no else section was defined.");
      case K::Filter: {
        Value subject = eval(*e.args[0], scope);
        Args args = eval_args(e, scope);
        return apply_filter(e.name, subject, args);
      }
      case K::Test: {
        // `x is defined` must not fail on an undefined x, so the subject is evaluated like any other value.
        Value subject = eval(*e.args[0], scope);
        Args args = eval_args(e, scope);
        return Value::boolean(apply_test(e.name, subject, args));
      }
      case K::Call: {
        Value fn = eval(*e.args[0], scope);
        Args args = eval_args(e, scope);
        return call_value(fn, args);
      }
    }
    throw Failure("unknown expression");
  }

  int depth_ = 0;
  int nesting_ = 0;
};

}  // namespace

Template::Template(std::string_view source) : body_(std::make_shared<const Body>(parse_template(source))) {}

std::string Template::render(const std::vector<std::pair<std::string, Value>>& vars) const {
  auto globals = std::make_shared<Scope>();
  add_builtin_globals(*globals);
  for (const auto& [k, v] : vars) globals->vars[k] = v;
  ScopePtr root = child(globals);
  Evaluator ev;
  std::string out;
  ev.exec(*body_, root, out);
  return out;
}

}  // namespace kiln::jinja
