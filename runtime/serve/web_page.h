#pragma once
// The chat page `kiln serve` answers at `/`: one self-contained HTML document (inline CSS and JS, no external
// assets), compiled into the binary. It talks to /v1/chat/completions like any other client, so it holds no data and
// needs no API key to load; the key the user types stays in the page and goes out only as the Bearer header.
#include <string_view>

namespace kiln::serve {

std::string_view web_chat_page();

// Response headers for the page: no outside resources, connections only back to this server, not framed elsewhere.
inline constexpr const char* kWebPageContentType = "text/html; charset=utf-8";
inline constexpr const char* kWebPageSecurityPolicy =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

}  // namespace kiln::serve
