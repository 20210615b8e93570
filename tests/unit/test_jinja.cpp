// The Jinja interpreter's behaviour on its own; byte parity with transformers is checked by the pytest oracle tests.
#include <gtest/gtest.h>

#include "runtime/core/error.h"
#include "runtime/text/jinja/jinja.h"

namespace kiln::jinja {
namespace {

std::string render(const std::string& src, std::vector<std::pair<std::string, Value>> vars = {}) {
  return Template(src).render(vars);
}

std::string error_of(const std::string& src) {
  try {
    render(src);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(Jinja, PrintsValuesLikePython) {
  EXPECT_EQ(render("{{ 1.0 }}|{{ True }}|{{ none }}|{{ 1e20 }}|{{ 1e-5 }}|{{ 0.1 + 0.2 }}"),
            "1.0|True|None|1e+20|1e-05|0.30000000000000004");
  EXPECT_EQ(render("{{ ['a', \"b'c\", None, (1,)] }}|{{ {'a': 1, 'b': [1.5]} }}"),
            "['a', \"b'c\", None, (1,)]|{'a': 1, 'b': [1.5]}");
  EXPECT_EQ(render("{{ x }}|{{ [x] }}"), "|[Undefined]");
}

TEST(Jinja, ArithmeticFollowsPython) {
  EXPECT_EQ(render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ -2 ** 2 }} {{ 2 ** 3 ** 2 }}"),
            "3 -4 2 3.5 1024 4 64");
  EXPECT_EQ(render("{{ 'ab' * 2 }}{{ [1] + [2] }}{{ 'a' ~ 1 ~ none }}{{ True + 1 }}"), "abab[1, 2]a1None2");
  EXPECT_NE(error_of("{{ 1 / 0 }}").find("division by zero"), std::string::npos);
  EXPECT_NE(error_of("{{ 'a' + 1 }}").find("can only concatenate str"), std::string::npos);
}

TEST(Jinja, WhitespaceControlMatchesTrimAndLstripBlocks) {
  EXPECT_EQ(render("a\n  {% if true %}\n    x\n  {% endif %}\nb"), "a\n    x\nb");
  EXPECT_EQ(render("  {%- if true -%}  y  {%- endif -%}  \nz"), "yz");
  EXPECT_EQ(render("{{ 'a' }}  \n  {{- 'b' }}"), "ab");
  EXPECT_EQ(render("start\n    {%+ if true %}kept{% endif %}"), "start\n    kept");
  EXPECT_EQ(render("x {# comment #}\n  {# own line #}\ny"), "x y");  // a comment eats its newline too
  EXPECT_EQ(render("{% raw %}{{ raw }}{% endraw %}"), "{{ raw }}");
  EXPECT_EQ(render("one\n"), "one");          // keep_trailing_newline=False drops one newline
  EXPECT_EQ(render("a\r\nb\rc"), "a\nb\nc");  // newlines are normalised
}

TEST(Jinja, LoopsScopesAndNamespaces) {
  EXPECT_EQ(render("{% for i in range(5) if i is odd %}{{ loop.index }}/{{ loop.length }}{% endfor %}"), "1/22/2");
  EXPECT_EQ(render("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}{{ v }}{% endfor %}"), "a1b2");
  EXPECT_EQ(render("{% for x in [] %}{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for i in range(9) %}{% if i == 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}"
                   "{% endif %}{{ i }}{% endfor %}"),
            "02");
  // `set` inside a loop does not leak out; a namespace does.
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [2] %}{% set x = i %}{% endfor %}{{ x }}"), "1");
  EXPECT_EQ(render("{% set ns = namespace(x=1) %}{% for i in [2] %}{% set ns.x = i %}{% endfor %}{{ ns.x }}"), "2");
  EXPECT_EQ(render("{% macro m(a, b='d') %}{{ a }}{{ b }}{% endmacro %}{{ m(1) }}{{ m(1, b=2) }}"), "1d12");
  EXPECT_EQ(render("{% set s %}in {{ 1 }}{% endset %}{{ s | upper }}"), "IN 1");
}

TEST(Jinja, Filters) {
  EXPECT_EQ(render("{{ '  a ' | trim }}|{{ [3, 1, 2] | sort | join(',') }}|{{ ['b', 'A'] | sort | first }}"),
            "a|1,2,3|A");
  EXPECT_EQ(render("{{ {'b': 1, 'a': [1, 'é']} | tojson }}"), "{\"b\": 1, \"a\": [1, \"é\"]}");
  EXPECT_EQ(render("{{ {'a': [1]} | tojson(indent=2) }}"), "{\n  \"a\": [\n    1\n  ]\n}");
  EXPECT_EQ(render("{{ x | default('d') }}{{ '' | default('e', true) }}{{ [1, 2] | length }}"), "de2");
  EXPECT_EQ(render("{{ [{'a': 1}, {'a': 0}] | selectattr('a') | map(attribute='a') | list }}"), "[1]");
  EXPECT_EQ(render("{{ 'hello world' | title }}|{{ 2.5 | round }}|{{ '4.7' | int }}|{{ 'x\ny' | indent(2) }}"),
            "Hello World|2.0|4|x\n  y");
}

TEST(Jinja, TestsAndMethods) {
  EXPECT_EQ(render("{{ x is defined }}{{ none is none }}{{ 1 is number }}{{ 'a' is string }}{{ 3 is divisibleby 3 }}"),
            "FalseTrueTrueTrueTrue");
  EXPECT_EQ(render("{{ 'a,b'.split(',') }}{{ ' x '.strip() }}{{ 'ab'.startswith('a') }}{{ 'héllo'[1:3] }}"),
            "['a', 'b']xTrueél");
  EXPECT_EQ(render("{{ {'a': 1}.get('b', 2) }}{{ 'abc'[::-1] }}{{ '{} {x}'.format(1, x=2) }}"), "2cba1 2");
}

TEST(Jinja, UndefinedSemantics) {
  EXPECT_EQ(render("{{ missing }}{{ missing | length }}{% for x in missing %}no{% endfor %}"), "0");
  EXPECT_EQ(render("{{ d.nope }}|{{ d.nope is defined }}", {{"d", Value::dict()}}), "|False");
  EXPECT_NE(error_of("{{ missing.attr }}").find("'missing' is undefined"), std::string::npos);
}

TEST(Jinja, ErrorsNameTheLine) {
  EXPECT_EQ(error_of("a\nb\n{{ 'x' | xmlattr }}"), "chat template line 3: unsupported filter 'xmlattr'");
  EXPECT_EQ(error_of("{{ 'x' | nosuch }}"), "chat template line 1: no filter named 'nosuch'");
  EXPECT_EQ(error_of("\n{% include 'other' %}"), "chat template line 2: unsupported tag 'include'");
  EXPECT_EQ(error_of("{% if true %}"), "chat template line 1: unexpected end of template; expected elif");
  EXPECT_EQ(error_of("{{ [1].append(2) }}"),
            "chat template line 1: access to attribute 'append' of 'list' object is unsafe.");
}

TEST(Jinja, ErrorInsideBranchNotTakenIsNotRaised) {
  EXPECT_EQ(render("{% if false %}{{ 'x' | xmlattr }}{% endif %}ok"), "ok");
}

TEST(Jinja, RecursionIsBounded) {
  EXPECT_NE(error_of("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").find("recursion"), std::string::npos);
}

}  // namespace
}  // namespace kiln::jinja
