#pragma once
// Cross-origin access for `kiln serve` (--allow-origin). Off by default: a browser page from another origin then
// cannot read the API's answers. With origins given, preflight OPTIONS requests are answered and responses to allowed
// origins carry the CORS headers; other origins get none. No networking here, so the rules are easy to test.
#include <string>
#include <utility>
#include <vector>

namespace kiln::serve {

using HeaderList = std::vector<std::pair<std::string, std::string>>;

class CorsPolicy {
 public:
  CorsPolicy() = default;
  // Each entry is "*" or an origin "scheme://host[:port]" (kiln::Error naming a malformed one). Trailing "/" is
  // dropped; the comparison is case-insensitive in scheme and host, as origins are.
  explicit CorsPolicy(const std::vector<std::string>& origins);

  bool enabled() const { return any_ || !origins_.empty(); }
  bool allows(const std::string& origin) const;
  // Headers for an actual (non-preflight) response to a request with this Origin; empty when not allowed.
  HeaderList response_headers(const std::string& origin) const;
  // Headers for the answer to a preflight; empty when the origin is not allowed. `requested_headers` is the
  // request's Access-Control-Request-Headers, echoed when it is a plain list of header names.
  HeaderList preflight_headers(const std::string& origin, const std::string& requested_headers) const;

 private:
  bool any_ = false;
  std::vector<std::string> origins_;  // normalized
};

}  // namespace kiln::serve
