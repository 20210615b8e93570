// Chat-template parser, part 1: the token cursor and the statements (see jinja_parser.h).
#include "runtime/text/jinja/parser.h"

namespace kiln::jinja {

std::string Parser::describe(const Token& t) const {
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

ExprPtr Parser::node(Expr::Kind kind, int line) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->line = line;
  return e;
}

// Statements until a block tag whose first name is in `ends` (left unconsumed, positioned at that name).
Body Parser::subparse(const std::set<std::string>& ends) {
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
Body Parser::parse_body(const std::set<std::string>& ends, bool drop) {
  Body body = subparse(ends);
  if (cur().type == Tok::Eof) fail("unexpected end of template");
  advance();
  if (drop) expect_block_end();
  return body;
}

StmtPtr Parser::stmt(Stmt::Kind kind, int line) {
  auto s = std::make_unique<Stmt>();
  s->kind = kind;
  s->line = line;
  return s;
}

StmtPtr Parser::parse_statement() {
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
    if (loop_depth_ == 0) throw Error("chat template line " + std::to_string(line) + ": '" + tag + "' outside a loop");
    expect_block_end();
    return stmt(tag == "break" ? Stmt::Kind::Break : Stmt::Kind::Continue, line);
  }
  throw Error("chat template line " + std::to_string(line) + ": unsupported tag '" + tag + "'");
}

StmtPtr Parser::parse_if(int line) {
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

StmtPtr Parser::parse_for(int line) {
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
std::vector<std::string> Parser::parse_assign_names(const std::set<std::string>& extra_end) {
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

StmtPtr Parser::parse_set(int line) {
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
void Parser::parse_filter_chain(std::vector<ExprPtr>& out, bool leading_pipe) {
  bool first = !leading_pipe;
  while (first || skip_op("|")) {
    first = false;
    out.push_back(parse_filter_call(nullptr));
  }
}

void Parser::parse_signature(Stmt& s) {
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

StmtPtr Parser::parse_macro(int line) {
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

StmtPtr Parser::parse_call_block(int line) {
  auto s = stmt(Stmt::Kind::CallBlock, line);
  if (is_op("(")) parse_signature(*s);
  ExprPtr call = parse_expression(true);
  if (call->kind != Expr::Kind::Call) fail("expected call");
  s->exprs.push_back(std::move(call));
  expect_block_end();
  s->bodies.push_back(parse_body({"endcall"}, true));
  return s;
}

Body parse_template(std::string_view source) { return Parser(tokenize_template(source)).parse_all(); }

}  // namespace kiln::jinja
