#include "runtime/serve/cors.h"

#include <algorithm>
#include <cctype>

#include "runtime/core/error.h"

namespace kiln::serve {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

// Returns the canonical form of an origin, or "" when it is not one (no scheme, a path, a query, user info, spaces).
std::string normalize_origin(std::string o) {
  if (!o.empty() && o.back() == '/') o.pop_back();
  const size_t sep = o.find("://");
  if (sep == std::string::npos || sep == 0 || sep + 3 >= o.size()) return {};
  for (size_t i = 0; i < sep; ++i) {
    const unsigned char c = static_cast<unsigned char>(o[i]);
    if (!std::isalnum(c) && c != '+' && c != '-' && c != '.') return {};
  }
  for (size_t i = sep + 3; i < o.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(o[i]);
    if (std::isspace(c) || std::iscntrl(c) || c == '/' || c == '?' || c == '#' || c == '@') return {};
  }
  return lower(std::move(o));
}

// A header-name list as browsers send it: tokens separated by commas and spaces.
bool is_header_list(const std::string& s) {
  if (s.empty() || s.size() > 1024) return false;
  return std::all_of(s.begin(), s.end(),
                     [](unsigned char c) { return std::isalnum(c) || c == '-' || c == '_' || c == ',' || c == ' '; });
}

}  // namespace

CorsPolicy::CorsPolicy(const std::vector<std::string>& origins) {
  for (const std::string& o : origins) {
    if (o == "*") {
      any_ = true;
      continue;
    }
    std::string n = normalize_origin(o);
    if (n.empty())
      throw Error("--allow-origin: '" + o.substr(0, 200) + "' is not an origin (scheme://host[:port]) or *");
    origins_.push_back(std::move(n));
  }
}

bool CorsPolicy::allows(const std::string& origin) const {
  if (origin.empty()) return false;
  if (any_) return true;
  const std::string n = normalize_origin(origin);
  return !n.empty() && std::find(origins_.begin(), origins_.end(), n) != origins_.end();
}

HeaderList CorsPolicy::response_headers(const std::string& origin) const {
  if (!allows(origin)) return {};
  // A listed origin is echoed, so caches must key on Origin; "*" is the same for everyone.
  if (any_) return {{"Access-Control-Allow-Origin", "*"}};
  return {{"Access-Control-Allow-Origin", origin}, {"Vary", "Origin"}};
}

HeaderList CorsPolicy::preflight_headers(const std::string& origin, const std::string& requested_headers) const {
  HeaderList h = response_headers(origin);
  if (h.empty()) return h;
  h.emplace_back("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
  h.emplace_back("Access-Control-Allow-Headers",
                 is_header_list(requested_headers) ? requested_headers : "Authorization, Content-Type");
  h.emplace_back("Access-Control-Max-Age", "600");
  return h;
}

}  // namespace kiln::serve
