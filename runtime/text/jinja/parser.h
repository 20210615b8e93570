#pragma once
// The chat-template parser's class, shared by its two halves: jinja_parser.cpp (the token cursor and the statements)
// and jinja_parse_expr.cpp (the expressions). Private to runtime/text; everything else calls parse_template().
//
// Recursive descent over the token stream, following the grammar and precedence of jinja2's parser.py (including
// its quirks: unary minus binds tighter than **, ** is left-associative, filters and tests bind to the unary).
#include <set>
#include <string>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/text/jinja/ast.h"
#include "runtime/text/jinja/lexer.h"

namespace kiln::jinja {

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) { check_tag_lengths(); }

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

  std::string describe(const Token& t) const;

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

  ExprPtr node(Expr::Kind kind, int line);

  // Statements until a block tag whose first name is in `ends` (left unconsumed, positioned at that name).
  Body subparse(const std::set<std::string>& ends);

  // Parses a body ending with one of `ends`; consumes the end name and, when `drop` is set, the block end too.
  Body parse_body(const std::set<std::string>& ends, bool drop);

  StmtPtr stmt(Stmt::Kind kind, int line);

  StmtPtr parse_statement();

  StmtPtr parse_if(int line);

  StmtPtr parse_for(int line);

  // A name or a tuple of names (`a, b` or `(a, b)`).
  std::vector<std::string> parse_assign_names(const std::set<std::string>& extra_end);

  StmtPtr parse_set(int line);

  // `name(args)|name2...` with no subject, for {% filter %} and {% set x | f %}.
  void parse_filter_chain(std::vector<ExprPtr>& out, bool leading_pipe = false);

  void parse_signature(Stmt& s);

  StmtPtr parse_macro(int line);

  StmtPtr parse_call_block(int line);

  // ---- expressions ----
  bool is_tuple_end(const std::set<std::string>& extra_end) const {
    if (cur().type == Tok::VarEnd || cur().type == Tok::BlockEnd || cur().type == Tok::Eof) return true;
    if (is_op(")")) return true;
    return cur().type == Tok::Name && extra_end.count(cur().text);
  }

  ExprPtr parse_tuple(bool with_condexpr, const std::set<std::string>& extra_end, bool explicit_parens);

  // Left-associative chains (a ~ b ~ c ..., x|f|g ..., a.b.c ...) are parsed by loops but nest the tree one level per
  // link, and the tree is evaluated and freed recursively: bounding the tokens of one tag bounds that depth.
  static constexpr size_t kMaxTagTokens = 4096;
  void check_tag_lengths() const {
    size_t in_tag = 0;
    for (const Token& t : toks_) {
      if (t.type == Tok::VarBegin || t.type == Tok::BlockBegin) in_tag = 0;
      if (++in_tag > kMaxTagTokens)
        throw Error("chat template line " + std::to_string(t.line) + ": a tag longer than " +
                    std::to_string(kMaxTagTokens) + " tokens");
    }
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

  ExprPtr parse_condexpr();

  ExprPtr binary(Expr::Kind kind, std::string op, ExprPtr a, ExprPtr b, int line);

  ExprPtr parse_or();

  ExprPtr parse_and();

  ExprPtr parse_not();

  ExprPtr parse_compare();

  ExprPtr parse_math1();

  ExprPtr parse_concat();

  ExprPtr parse_math2();

  ExprPtr parse_pow();

  ExprPtr parse_unary(bool with_filter);

  ExprPtr parse_primary();

  ExprPtr parse_postfix(ExprPtr e);

  ExprPtr parse_filter_expr(ExprPtr e);

  ExprPtr parse_subscript(ExprPtr obj);

  ExprPtr parse_subscribed();

  void parse_call_args(Expr& e);

  ExprPtr parse_call(ExprPtr callee);

  std::string dotted_name();

  ExprPtr parse_filter_call(ExprPtr subject);

  ExprPtr parse_test(ExprPtr subject);

  std::vector<Token> toks_;
  size_t pos_ = 0;
  int loop_depth_ = 0;
  int depth_ = 0;
};

}  // namespace kiln::jinja
