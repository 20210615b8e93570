// Recursive descent over the token stream, following the grammar and precedence of jinja2's parser.py (including
// its quirks: unary minus binds tighter than **, ** is left-associative, filters and tests bind to the unary).
#include <set>

#include "runtime/core/error.h"
#include "runtime/text/jinja_ast.h"
#include "runtime/text/jinja_lexer.h"

namespace kiln::jinja {
namespace {

// Everything jinja2 3.1 knows; a name outside these is a compile error there too. Known names that kiln does not
// implement fail only when evaluated, as a branch that never runs renders fine in jinja2.
const std::set<std::string>& jinja2_filters() {
  static const std::set<std::string> names = {
      "abs",       "attr",       "batch",       "capitalize", "center",  "count",
      "d",         "default",    "dictsort",    "e",          "escape",  "filesizeformat",
      "first",     "float",      "forceescape", "format",     "groupby", "indent",
      "int",       "join",       "last",        "length",     "list",    "lower",
      "items",     "map",        "min",         "max",        "pprint",  "random",
      "reject",    "rejectattr", "replace",     "reverse",    "round",   "safe",
      "select",    "selectattr", "slice",       "sort",       "string",  "striptags",
      "sum",       "title",      "trim",        "truncate",   "unique",  "upper",
      "urlencode", "urlize",     "wordcount",   "wordwrap",   "xmlattr", "tojson"};
  return names;
}

const std::set<std::string>& jinja2_tests() {
  static const std::set<std::string> names = {
      "odd",     "even",   "divisibleby", "defined",  "undefined", "filter", "test",    "none",
      "boolean", "false",  "true",        "integer",  "float",     "lower",  "upper",   "string",
      "mapping", "number", "sequence",    "iterable", "callable",  "sameas", "escaped", "in",
      "==",      "eq",     "equalto",     "!=",       "ne",        ">",      "gt",      "greaterthan",
      ">=",      "ge",     "<",           "lt",       "lessthan",  "<=",     "le"};
  return names;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}

  Body parse_all() {
    Body body = subparse({});
    if (cur().type != Tok::Eof) fail("unexpected tag");
    return body;
  }

 private:
  const Token& cur() const { return toks_[pos_]; }
  const Token& peek(size_t n = 1) const { return toks_[std::min(pos_ + n, toks_.size() - 1)]; }
  const Token& advance() { return toks_[pos_ < toks_.size() - 1 ? pos_++ : pos_]; }
  bool is_op(const char* op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Tok::Name && cur().text == n; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    advance();
    return true;
  }
  bool skip_name(const char* n) {
    if (!is_name(n)) return false;
    advance();
    return true;
  }

  [[noreturn]] void fail(const std::string& message) const {
    throw Error("chat template line " + std::to_string(cur().line) + ": " + message);
  }

  std::string describe(const Token& t) const {
    switch (t.type) {
      case Tok::Eof:
        return "end of template";
      case Tok::VarEnd:
        return "end of print statement";
      case Tok::BlockEnd:
        return "end of statement block";
      case Tok::Data:
        return "template data";
      default:
        return "'" + t.text + "'";
    }
  }

  void expect_op(const char* op) {
    if (!skip_op(op)) fail(std::string("expected '") + op + "', got " + describe(cur()));
  }
  void expect_name(const char* n) {
    if (!skip_name(n)) fail(std::string("expected '") + n + "', got " + describe(cur()));
  }
  std::string expect_identifier() {
    if (cur().type != Tok::Name) fail("expected a name, got " + describe(cur()));
    return advance().text;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) fail("expected end of statement block, got " + describe(cur()));
    advance();
  }

  ExprPtr node(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // Statements until a block tag whose first name is in `ends` (left unconsumed, positioned at that name).
  Body subparse(const std::set<std::string>& ends) {
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == Tok::Eof) {
        if (!ends.empty()) fail("unexpected end of template; expected " + *ends.begin());
        return body;
      }
      if (t.type == Tok::Data) {
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::Data;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        advance();
      } else if (t.type == Tok::VarBegin) {
        advance();
        auto s = std::make_unique<Stmt>();
        s->kind = Stmt::Kind::Output;
        s->line = t.line;
        s->exprs.push_back(parse_tuple(true, {}, false));
        if (cur().type != Tok::VarEnd) fail("expected end of print statement, got " + describe(cur()));
        advance();
        body.push_back(std::move(s));
      } else if (t.type == Tok::BlockBegin) {
        advance();
        if (cur().type == Tok::Name && ends.count(cur().text)) return body;
        body.push_back(parse_statement());
      } else {
        fail("unexpected " + describe(t));
      }
    }
  }

  // Parses a body ending with one of `ends`; consumes the end name and, when `drop` is set, the block end too.
  Body parse_body(const std::set<std::string>& ends, bool drop) {
    Body body = subparse(ends);
    if (cur().type == Tok::Eof) fail("unexpected end of template");
    advance();
    if (drop) expect_block_end();
    return body;
  }

  StmtPtr stmt(Stmt::Kind kind, int line) {
    auto s = std::make_unique<Stmt>();
    s->kind = kind;
    s->line = line;
    return s;
  }

  StmtPtr parse_statement() {
    DepthGuard guard(*this);
    if (cur().type != Tok::Name) fail("tag name expected");
    std::string tag = cur().text;
    int line = cur().line;
    advance();
    if (tag == "if") return parse_if(line);
    if (tag == "for") return parse_for(line);
    if (tag == "set") return parse_set(line);
    if (tag == "macro") return parse_macro(line);
    if (tag == "call") return parse_call_block(line);
    if (tag == "filter") {
      auto s = stmt(Stmt::Kind::FilterBlock, line);
      parse_filter_chain(s->exprs);
      expect_block_end();
      s->bodies.push_back(parse_body({"endfilter"}, true));
      return s;
    }
    if (tag == "with") {
      auto s = stmt(Stmt::Kind::With, line);
      while (cur().type != Tok::BlockEnd) {
        if (!s->params.empty()) expect_op(",");
        std::string name = expect_identifier();
        expect_op("=");
        s->params.emplace_back(name, parse_expression(true));
      }
      expect_block_end();
      s->bodies.push_back(parse_body({"endwith"}, true));
      return s;
    }
    if (tag == "generation") {
      auto s = stmt(Stmt::Kind::Generation, line);
      expect_block_end();
      s->bodies.push_back(parse_body({"endgeneration"}, true));
      return s;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0)
        throw Error("chat template line " + std::to_string(line) + ": '" + tag + "' outside a loop");
      expect_block_end();
      return stmt(tag == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue, line);
    }
    throw Error("chat template line " + std::to_string(line) + ": unsupported tag '" + tag + "'");
  }

  StmtPtr parse_if(int line) {
    auto s = stmt(Stmt::Kind::If, line);
    while (true) {
      s->exprs.push_back(parse_tuple(false, {}, false));
      expect_block_end();
      s->bodies.push_back(subparse({"elif", "else", "endif"}));
      std::string t = advance().text;
      if (t == "elif") continue;
      if (t == "else") {
        expect_block_end();
        s->bodies.push_back(parse_body({"endif"}, true));
      } else {
        expect_block_end();
      }
      return s;
    }
  }

  StmtPtr parse_for(int line) {
    auto s = stmt(Stmt::Kind::For, line);
    s->targets = parse_assign_names({"in"});
    expect_name("in");
    s->exprs.push_back(parse_tuple(false, {"recursive"}, false));
    if (skip_name("if")) s->exprs.push_back(parse_expression(false));
    if (is_name("recursive")) fail("recursive for loops are not supported");
    expect_block_end();
    ++loop_depth_;
    s->bodies.push_back(subparse({"endfor", "else"}));
    --loop_depth_;
    std::string t = advance().text;
    expect_block_end();
    s->bodies.push_back(t == "else" ? parse_body({"endfor"}, true) : Body());
    return s;
  }

  // A name or a tuple of names (`a, b` or `(a, b)`).
  std::vector<std::string> parse_assign_names(const std::set<std::string>& extra_end) {
    std::vector<std::string> names;
    bool paren = skip_op("(");
    while (true) {
      names.push_back(expect_identifier());
      if (!skip_op(",")) break;
      if (is_op(")") || (cur().type == Tok::Name && extra_end.count(cur().text))) break;
    }
    if (paren) expect_op(")");
    return names;
  }

  StmtPtr parse_set(int line) {
    std::string attr;
    std::vector<std::string> targets;
    if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == ".") {
      targets.push_back(advance().text);
      advance();
      attr = expect_identifier();
    } else {
      targets = parse_assign_names({});
    }
    if (skip_op("=")) {
      auto s = stmt(Stmt::Kind::Set, line);
      s->targets = std::move(targets);
      s->name = attr;
      s->exprs.push_back(parse_tuple(true, {}, false));
      expect_block_end();
      return s;
    }
    if (!attr.empty() || targets.size() != 1) fail("expected '='");
    auto s = stmt(Stmt::Kind::SetBlock, line);
    s->targets = std::move(targets);
    if (is_op("|")) parse_filter_chain(s->exprs, true);
    expect_block_end();
    s->bodies.push_back(parse_body({"endset"}, true));
    return s;
  }

  // `name(args)|name2...` with no subject, for {% filter %} and {% set x | f %}.
  void parse_filter_chain(std::vector<ExprPtr>& out, bool leading_pipe = false) {
    bool first = !leading_pipe;
    while (first || skip_op("|")) {
      first = false;
      out.push_back(parse_filter_call(nullptr));
    }
  }

  void parse_signature(Stmt& s) {
    expect_op("(");
    while (!is_op(")")) {
      if (!s.params.empty()) expect_op(",");
      std::string name = expect_identifier();
      ExprPtr def;
      if (skip_op("=")) def = parse_expression(true);
      s.params.emplace_back(name, std::move(def));
    }
    expect_op(")");
  }

  StmtPtr parse_macro(int line) {
    auto s = stmt(Stmt::Kind::Macro, line);
    s->name = expect_identifier();
    parse_signature(*s);
    expect_block_end();
    int saved = loop_depth_;
    loop_depth_ = 0;
    s->bodies.push_back(parse_body({"endmacro"}, true));
    loop_depth_ = saved;
    return s;
  }

  StmtPtr parse_call_block(int line) {
    auto s = stmt(Stmt::Kind::CallBlock, line);
    if (is_op("(")) parse_signature(*s);
    ExprPtr call = parse_expression(true);
    if (call->kind != Expr::Kind::Call) fail("expected call");
    s->exprs.push_back(std::move(call));
    expect_block_end();
    s->bodies.push_back(parse_body({"endcall"}, true));
    return s;
  }

  // ---- expressions ----

  bool is_tuple_end(const std::set<std::string>& extra_end) const {
    if (cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || cur().type == Tok::Eof) return true;
    if (is_op(")")) return true;
    return cur().type == Tok::Name && extra_end.count(cur().text);
  }

  ExprPtr parse_tuple(bool with_condexpr, const std::set<std::string>& extra_end, bool explicit_parens) {
    int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      items.push_back(parse_expression(with_condexpr));
      if (is_op(","))
        is_tuple = true;
      else
        break;
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) fail("expected an expression, got " + describe(cur()));
    }
    auto t = node(Expr::Kind::Tuple, line);
    t->args = std::move(items);
    return t;
  }

  // Nesting depth guard: malformed input like "((((((..." must fail cleanly instead of overflowing the stack.
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser) : p(parser) {
      if (++p.depth_ > 200) p.fail("expressions or blocks nested too deeply");
    }
    ~DepthGuard() { --p.depth_; }
  };

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    ExprPtr expr = parse_or();
    while (is_name("if")) {
      int line = advance().line;
      auto c = node(Expr::Kind::CondExpr, line);
      ExprPtr test = parse_or();
      ExprPtr other = skip_name("else") ? parse_condexpr() : nullptr;
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(expr));
      c->args.push_back(std::move(other));
      expr = std::move(c);
    }
    return expr;
  }

  ExprPtr binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b, int line) {
    auto e = node(kind, line);
    e->name = std::move(op);
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      int line = advance().line;
      left = binary(Expr::Kind::Or, "or", std::move(left), parse_and(), line);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      int line = advance().line;
      left = binary(Expr::Kind::And, "and", std::move(left), parse_not(), line);
    }
    return left;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      auto e = node(Expr::Kind::Not, advance().line);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().type == Tok::Op &&
          (is_op("==") || is_op("!=") || is_op("<") || is_op("<=") || is_op(">") || is_op(">="))) {
        op = advance().text;
      } else if (is_name("in")) {
        advance();
        op = "in";
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        advance();
        advance();
        op = "notin";
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::Kind::Compare, line);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = advance();
      left = binary(Expr::Kind::Binary, t.text, std::move(left), parse_concat(), t.line);
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      int line = advance().line;
      left = binary(Expr::Kind::Binary, "~", std::move(left), parse_math2(), line);
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = advance();
      left = binary(Expr::Kind::Binary, t.text, std::move(left), parse_pow(), t.line);
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      int line = advance().line;
      left = binary(Expr::Kind::Binary, "**", std::move(left), parse_unary(true), line);
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const Token& t = advance();
      e = node(Expr::Kind::Unary, t.line);
      e->name = t.text;
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    int line = t.line;
    if (t.type == Tok::Name) {
      advance();
      auto e = node(Expr::Kind::Const, line);
      if (t.text == "true" || t.text == "True")
        e->value = Value::boolean(true);
      else if (t.text == "false" || t.text == "False")
        e->value = Value::boolean(false);
      else if (t.text == "none" || t.text == "None")
        e->value = Value::none();
      else {
        e->kind = Expr::Kind::Name;
        e->name = t.text;
      }
      return e;
    }
    if (t.type == Tok::String) {
      std::string s;
      while (cur().type == Tok::String) s += advance().text;
      auto e = node(Expr::Kind::Const, line);
      e->value = Value::string(std::move(s));
      return e;
    }
    if (t.type == Tok::Int || t.type == Tok::Float) {
      auto e = node(Expr::Kind::Const, line);
      e->value = t.type == Tok::Int ? Value::integer(t.ival) : Value::number(t.fval);
      advance();
      return e;
    }
    if (is_op("(")) {
      advance();
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      advance();
      auto e = node(Expr::Kind::List, line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (is_op("{")) {
      advance();
      auto e = node(Expr::Kind::Dict, line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    fail("unexpected " + describe(t));
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        advance();
        e = parse_filter_call(std::move(e));
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    const Token& t = advance();
    int line = t.line;
    if (t.text == ".") {
      if (cur().type == Tok::Name) {
        auto e = node(Expr::Kind::Getattr, line);
        e->args.push_back(std::move(obj));
        e->name = advance().text;
        return e;
      }
      if (cur().type != Tok::Int) fail("expected name or number");
      auto e = node(Expr::Kind::Getitem, line);
      e->args.push_back(std::move(obj));
      auto idx = node(Expr::Kind::Const, line);
      idx->value = Value::integer(advance().ival);
      e->args.push_back(std::move(idx));
      return e;
    }
    std::vector<ExprPtr> subs;
    while (!is_op("]")) {
      if (!subs.empty()) expect_op(",");
      subs.push_back(parse_subscribed());
    }
    expect_op("]");
    auto e = node(Expr::Kind::Getitem, line);
    e->args.push_back(std::move(obj));
    if (subs.size() == 1) {
      e->args.push_back(std::move(subs[0]));
    } else {
      auto tup = node(Expr::Kind::Tuple, line);
      tup->args = std::move(subs);
      e->args.push_back(std::move(tup));
    }
    return e;
  }

  ExprPtr parse_subscribed() {
    int line = cur().line;
    auto slice = node(Expr::Kind::Slice, line);
    if (is_op(":")) {
      advance();
      slice->args.push_back(nullptr);
    } else {
      ExprPtr e = parse_expression(true);
      if (!is_op(":")) return e;
      advance();
      slice->args.push_back(std::move(e));
    }
    if (is_op(":")) {
      slice->args.push_back(nullptr);
    } else if (!is_op("]") && !is_op(",")) {
      slice->args.push_back(parse_expression(true));
    } else {
      slice->args.push_back(nullptr);
    }
    if (skip_op(":") && !is_op("]") && !is_op(","))
      slice->args.push_back(parse_expression(true));
    else
      slice->args.push_back(nullptr);
    return slice;
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) {
        expect_op(",");
        if (is_op(")")) break;
      }
      first = false;
      if (is_op("*") || is_op("**")) fail("*args and **kwargs in calls are not supported");
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        std::string key = advance().text;
        advance();
        e.kwargs.emplace_back(key, parse_expression(true));
      } else {
        if (!e.kwargs.empty()) fail("invalid syntax for function call expression");
        e.args.push_back(parse_expression(true));
      }
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = node(Expr::Kind::Call, cur().line);
    e->args.push_back(std::move(callee));
    parse_call_args(*e);
    return e;
  }

  std::string dotted_name() {
    std::string name = expect_identifier();
    while (is_op(".")) {
      advance();
      name += "." + expect_identifier();
    }
    return name;
  }

  ExprPtr parse_filter_call(ExprPtr subject) {
    int line = cur().line;
    auto e = node(Expr::Kind::Filter, line);
    e->name = dotted_name();
    if (!jinja2_filters().count(e->name))
      throw Error("chat template line " + std::to_string(line) + ": no filter named '" + e->name + "'");
    e->args.push_back(std::move(subject));
    if (is_op("(")) parse_call_args(*e);
    return e;
  }

  ExprPtr parse_test(ExprPtr subject) {
    int line = advance().line;  // 'is'
    bool negated = skip_name("not");
    auto e = node(Expr::Kind::Test, line);
    e->name = dotted_name();
    if (!jinja2_tests().count(e->name))
      throw Error("chat template line " + std::to_string(line) + ": no test named '" + e->name + "'");
    e->args.push_back(std::move(subject));
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((cur().type == Tok::Name || cur().type == Tok::String || cur().type == Tok::Int ||
                cur().type == Tok::Float || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail("You cannot chain multiple tests with is");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    if (!negated) return e;
    auto n = node(Expr::Kind::Not, line);
    n->args.push_back(std::move(e));
    return n;
  }

  std::vector<Token> toks_;
  size_t pos_ = 0;
  int loop_depth_ = 0;
  int depth_ = 0;
};

}  // namespace

Body parse_template(std::string_view source) { return Parser(tokenize_template(source)).parse_all(); }

}  // namespace kiln::jinja
