#pragma once
// The parsed template: one generic node type for expressions and one for statements. The layout of args/bodies per
// kind is documented next to each kind.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/text/jinja/value.h"

namespace kiln::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    Const,     // value
    Name,      // name
    Getattr,   // args[0].name
    Getitem,   // args[0][args[1]]
    Slice,     // args[0]:args[1]:args[2], each may be null
    List,      // args
    Tuple,     // args
    Dict,      // args: key, value, key, value, ...
    Unary,     // name ("-" or "+") args[0]
    Binary,    // args[0] name args[1]; name is + - * / // % ** ~
    Compare,   // args[0] ops[0] args[1] ops[1] args[2] ...; ops: == != < <= > >= in notin
    And,       // args[0] and args[1]
    Or,        // args[0] or args[1]
    Not,       // not args[0]
    CondExpr,  // args[1] if args[0] else args[2] (args[2] may be null)
    Filter,    // args[0] | name(args[1..], kwargs); args[0] is null inside {% filter %} blocks
    Test,      // args[0] is name(args[1..], kwargs)
    Call,      // args[0](args[1..], kwargs)
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct Stmt {
  enum class Kind {
    Data,         // text
    Output,       // {{ exprs[0] }}
    If,           // exprs[i] guards bodies[i]; an extra trailing body is the else branch
    For,          // for targets in exprs[0] [if exprs[1]]: bodies[0], else bodies[1]
    Set,          // targets = exprs[0]; with name set: targets[0].name = exprs[0]
    SetBlock,     // targets[0] = rendered bodies[0], piped through exprs (Filter nodes with null subject)
    Macro,        // macro name(params) bodies[0]
    CallBlock,    // call(params) exprs[0] with bodies[0] as caller()
    FilterBlock,  // bodies[0] rendered, piped through exprs
    With,         // params assigned in a new scope, then bodies[0]
    Break,
    Continue,
    Generation,  // transformers' {% generation %}: renders bodies[0]
  };
  Kind kind;
  int line = 0;
  std::string text;
  std::string name;
  std::vector<std::string> targets;
  std::vector<ExprPtr> exprs;
  std::vector<Body> bodies;
  std::vector<std::pair<std::string, ExprPtr>> params;  // default may be null
};

// Throws kiln::Error naming the line on syntax errors and unknown tags, filters or tests.
Body parse_template(std::string_view source);

}  // namespace kiln::jinja
