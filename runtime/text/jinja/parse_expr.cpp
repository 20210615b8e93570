// Chat-template parser, part 2: the expressions, from tuples down to primaries, filters and tests (see
// jinja_parser.h).
#include "runtime/text/jinja/parser.h"

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

}  // namespace

ExprPtr Parser::parse_tuple(bool with_condexpr, const std::set<std::string>& extra_end, bool explicit_parens) {
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

ExprPtr Parser::parse_condexpr() {
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

ExprPtr Parser::binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b, int line) {
  auto e = node(kind, line);
  e->name = std::move(op);
  e->args.push_back(std::move(a));
  e->args.push_back(std::move(b));
  return e;
}

ExprPtr Parser::parse_or() {
  ExprPtr left = parse_and();
  while (is_name("or")) {
    int line = advance().line;
    left = binary(Expr::Kind::Or, "or", std::move(left), parse_and(), line);
  }
  return left;
}

ExprPtr Parser::parse_and() {
  ExprPtr left = parse_not();
  while (is_name("and")) {
    int line = advance().line;
    left = binary(Expr::Kind::And, "and", std::move(left), parse_not(), line);
  }
  return left;
}

ExprPtr Parser::parse_not() {
  DepthGuard guard(*this);
  if (is_name("not")) {
    auto e = node(Expr::Kind::Not, advance().line);
    e->args.push_back(parse_not());
    return e;
  }
  return parse_compare();
}

ExprPtr Parser::parse_compare() {
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

ExprPtr Parser::parse_math1() {
  ExprPtr left = parse_concat();
  while (is_op("+") || is_op("-")) {
    const Token& t = advance();
    left = binary(Expr::Kind::Binary, t.text, std::move(left), parse_concat(), t.line);
  }
  return left;
}

ExprPtr Parser::parse_concat() {
  ExprPtr left = parse_math2();
  while (is_op("~")) {
    int line = advance().line;
    left = binary(Expr::Kind::Binary, "~", std::move(left), parse_math2(), line);
  }
  return left;
}

ExprPtr Parser::parse_math2() {
  ExprPtr left = parse_pow();
  while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
    const Token& t = advance();
    left = binary(Expr::Kind::Binary, t.text, std::move(left), parse_pow(), t.line);
  }
  return left;
}

ExprPtr Parser::parse_pow() {
  ExprPtr left = parse_unary(true);
  while (is_op("**")) {
    int line = advance().line;
    left = binary(Expr::Kind::Binary, "**", std::move(left), parse_unary(true), line);
  }
  return left;
}

ExprPtr Parser::parse_unary(bool with_filter) {
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

ExprPtr Parser::parse_primary() {
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

ExprPtr Parser::parse_postfix(ExprPtr e) {
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

ExprPtr Parser::parse_filter_expr(ExprPtr e) {
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

ExprPtr Parser::parse_subscript(ExprPtr obj) {
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

ExprPtr Parser::parse_subscribed() {
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

void Parser::parse_call_args(Expr& e) {
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

ExprPtr Parser::parse_call(ExprPtr callee) {
  auto e = node(Expr::Kind::Call, cur().line);
  e->args.push_back(std::move(callee));
  parse_call_args(*e);
  return e;
}

std::string Parser::dotted_name() {
  std::string name = expect_identifier();
  while (is_op(".")) {
    advance();
    name += "." + expect_identifier();
  }
  return name;
}

ExprPtr Parser::parse_filter_call(ExprPtr subject) {
  int line = cur().line;
  auto e = node(Expr::Kind::Filter, line);
  e->name = dotted_name();
  if (!jinja2_filters().count(e->name))
    throw Error("chat template line " + std::to_string(line) + ": no filter named '" + e->name + "'");
  e->args.push_back(std::move(subject));
  if (is_op("(")) parse_call_args(*e);
  return e;
}

ExprPtr Parser::parse_test(ExprPtr subject) {
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

}  // namespace kiln::jinja
