#pragma once
// A Jinja interpreter for chat templates. It renders what transformers' jinja2 environment renders (trim_blocks,
// lstrip_blocks, loop controls, sandboxed, default Undefined), byte for byte, for the subset that chat templates use.
// Anything outside that subset is an error naming the template line; it never renders something different.
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "runtime/text/jinja/value.h"

namespace kiln::jinja {

struct Stmt;

class Template {
 public:
  // Parses the source; throws kiln::Error ("chat template line N: ...") on syntax errors.
  explicit Template(std::string_view source);

  // Renders with `vars` as the template's globals (on top of range, dict, namespace, ...). Throws kiln::Error naming
  // the line on any failure, including raise_exception().
  std::string render(const std::vector<std::pair<std::string, Value>>& vars) const;

 private:
  std::shared_ptr<const std::vector<std::unique_ptr<Stmt>>> body_;
};

}  // namespace kiln::jinja
