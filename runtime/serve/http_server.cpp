#include "runtime/serve/http_server.h"

#include <httplib.h>
#include <strings.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "runtime/core/error.h"
#include "runtime/serve/cors.h"
#include "runtime/serve/http_api.h"
#include "runtime/serve/responses.h"
#include "runtime/serve/socket_io.h"
#include "runtime/serve/web_page.h"

namespace kiln::serve {

using json = nlohmann::ordered_json;

namespace {

// Compares without an early exit, so the time taken does not reveal how much of a key matched. Lengths may differ:
// the loop still runs over the longer of the two.
bool equal_constant_time(const std::string& a, const std::string& b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

int client_socket(const httplib::Request& req) {
  return find_client_socket(req.remote_addr, req.remote_port, req.local_port);
}

// "Bearer KEY" with the scheme in any case (RFC 9110: auth schemes are case-insensitive), else empty.
std::string bearer_token(const std::string& header) {
  constexpr size_t kScheme = 6;  // "Bearer"
  if (header.size() <= kScheme + 1 || strncasecmp(header.c_str(), "Bearer", kScheme) != 0 || header[kScheme] != ' ')
    return {};
  const size_t start = header.find_first_not_of(' ', kScheme);
  return start == std::string::npos ? std::string() : header.substr(start);
}

bool has_body(const httplib::Request& req) {
  return req.has_header("Transfer-Encoding") ||
         (req.has_header("Content-Length") && req.get_header_value("Content-Length") != "0");
}

enum class BodyRead { kOk, kTooLarge, kBroken };

// The Content-Length header checked against the limit (kOk also when there is none).
BodyRead declared_length(const httplib::Request& req, size_t limit) {
  if (!req.has_header("Content-Length")) return BodyRead::kOk;
  const std::string declared = req.get_header_value("Content-Length");
  char* end = nullptr;
  errno = 0;
  const unsigned long long n = std::strtoull(declared.c_str(), &end, 10);
  if (declared.empty() || declared[0] == '-' || *end != '\0' || errno == ERANGE) return BodyRead::kBroken;
  return n > limit ? BodyRead::kTooLarge : BodyRead::kOk;
}

const char* reason_phrase(int status) {
  switch (status) {
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 413:
      return "Payload Too Large";
    default:
      return "Error";
  }
}

// Reads a body through httplib's content reader, which un-chunks and decompresses (gzip, deflate, br): the limit
// applies to the bytes as they come out of it, so neither a chunked body nor a compressed one can exceed it, and
// reading stops at the first byte beyond. A declared Content-Length beyond the limit is refused unread. `keep`:
// store the bytes (else they are only counted).
BodyRead read_body(const httplib::Request& req, const httplib::ContentReader& reader, size_t limit, bool keep,
                   std::string& body) {
  if (const BodyRead declared = declared_length(req, limit); declared != BodyRead::kOk) return declared;
  size_t seen = 0;
  bool over = false;
  const bool ok = reader([&](const char* data, size_t len) {
    if (len > limit - seen) {
      over = true;
      return false;
    }
    seen += len;
    if (keep) body.append(data, len);
    return true;
  });
  if (over) return BodyRead::kTooLarge;
  return ok ? BodyRead::kOk : BodyRead::kBroken;
}

}  // namespace

struct ClaimedPort::Impl {
  std::unique_ptr<httplib::Server> server = std::make_unique<httplib::Server>();
  std::string host;
  int port = 0;
  int sock = -1;        // the bound socket, seen by the socket-options hook (httplib does not expose it)
  bool served = false;  // once a server answered on it, httplib's stop() closes the socket

  ~Impl() {
    if (!served && sock >= 0) close(sock);
  }
};

ClaimedPort::ClaimedPort(const std::string& host, int port) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.host = host;
  // Called for each candidate socket before its bind; the last one is the one bound (httplib closes failed ones).
  m.server->set_socket_options([&m](int sock) {
    listen_socket_options(sock);
    m.sock = sock;
  });
  if (port == 0) {
    m.port = m.server->bind_to_any_port(host);
    if (m.port <= 0) throw Error("cannot listen on " + host + " (any port): " + bind_failure(host, 0));
  } else if (m.server->bind_to_port(host, port)) {
    m.port = port;
  } else {
    throw Error("cannot listen on " + host + ":" + std::to_string(port) + ": " + bind_failure(host, port));
  }
  m.server->set_socket_options(listen_socket_options);  // the hook's reference to `m` must not outlive this call
  if (m.sock >= 0) deepen_accept_queue(m.sock);
}

ClaimedPort::ClaimedPort(ClaimedPort&&) noexcept = default;
ClaimedPort::~ClaimedPort() = default;
const std::string& ClaimedPort::host() const { return impl_->host; }
int ClaimedPort::port() const { return impl_->port; }

struct HttpServer::Impl {
  ClaimedPort port;
  httplib::Server& server;
  AsyncScheduler& engine;
  Metrics& metrics;
  const Tokenizer& tok;
  const ChatTemplate* tpl;
  HttpOptions opt;
  std::atomic<bool> draining{false};
  std::atomic<uint64_t> next_id{1};
  CorsPolicy cors;
  PromptBound bound;

  Impl(ClaimedPort p, AsyncScheduler& e, Metrics& m, const Tokenizer& t, const ChatTemplate* c, HttpOptions o)
      : port(std::move(p)),
        server(*port.impl_->server),
        engine(e),
        metrics(m),
        tok(t),
        tpl(c),
        opt(std::move(o)),
        cors(opt.allow_origins) {
    bound.context = opt.context;
    if (bound.context > 0) bound.longest_token_bytes = longest_token_bytes(tok);
  }

  // Adds the CORS headers for an allowed Origin; answers a preflight (true) before authentication, since browsers
  // send preflights without the key.
  bool answer_cors(const httplib::Request& req, httplib::Response& res) {
    if (!cors.enabled() || !req.has_header("Origin")) return false;
    const std::string origin = req.get_header_value("Origin");
    if (req.method == "OPTIONS" && req.has_header("Access-Control-Request-Method")) {
      const HeaderList h = cors.preflight_headers(origin, req.get_header_value("Access-Control-Request-Headers"));
      if (h.empty()) {
        send_error(res, 403, "this origin is not allowed (--allow-origin)");
        return true;
      }
      for (const auto& [k, v] : h) res.set_header(k, v);
      res.status = 204;
      return true;
    }
    for (const auto& [k, v] : cors.response_headers(origin)) res.set_header(k, v);
    return false;
  }

  // For a request whose body was not (wholly) read: httplib would parse the rest of it as the next request on the
  // connection. Send the answer on the socket directly and shut the socket's sending side, so that the connection
  // ends after it (httplib's own write of `res` then fails and it closes the connection).
  void answer_and_close(const httplib::Request& req, httplib::Response& res, int status, const std::string& msg,
                        const char* extra_header = nullptr) {
    send_error(res, status, msg);
    res.set_header("Connection", "close");
    const int fd = client_socket(req);
    if (fd < 0) return;
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) +
                      "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(res.body.size()) +
                      "\r\nConnection: close\r\n";
    if (extra_header) out += std::string(extra_header) + "\r\n";
    write_all(fd, out + "\r\n" + res.body);
    finish_connection(fd);
  }

  std::string too_large() const {
    return "the request body exceeds " + std::to_string(opt.max_body_bytes) + " bytes (after decompression)";
  }

  // Reads the body of a request into `body`; false when it answered instead (413, or 400 for a broken body).
  bool read_request_body(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader,
                         bool keep, std::string& body) {
    switch (read_body(req, reader, opt.max_body_bytes, keep, body)) {
      case BodyRead::kOk:
        return true;
      case BodyRead::kTooLarge:
        answer_and_close(req, res, 413, too_large());
        return false;
      case BodyRead::kBroken:
        answer_and_close(req, res, 400, "the request body could not be read (bad length, chunking or encoding)");
        return false;
    }
    return false;
  }

  void send_error(httplib::Response& res, int status, const std::string& msg, const std::string& param = {}) {
    res.status = status;
    metrics.http_error(status);
    if (status == 429) res.set_header("Retry-After", "1");
    res.set_content(error_body(status, msg, param), "application/json");
  }

  static std::string bearer_key(const httplib::Request& req) {
    return bearer_token(req.get_header_value("Authorization"));
  }

  bool authorized(const httplib::Request& req) {
    if (opt.api_keys.empty()) return true;
    const std::string key = bearer_key(req);
    if (key.empty()) return false;
    bool ok = false;
    for (const auto& k : opt.api_keys) ok |= equal_constant_time(key, k);  // no early exit over keys either
    return ok;
  }

  void completion(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader,
                  bool chat) {
    std::string body;
    if (!read_request_body(req, res, reader, true, body)) return;
    if (draining) return send_error(res, 503, "the server is shutting down");
    ApiRequest r;
    std::shared_ptr<RequestStream> stream;
    try {
      r = parse_request(body, chat, tok, tpl, bound);
      RequestOptions ro;
      ro.n = r.n;
      // Only a checked key names a tenant; without --api-key whatever a client sends is no identity.
      if (opt.cache_salt_per_key && !opt.api_keys.empty()) ro.cache_salt = bearer_key(req);
      stream = engine.submit(r.prompt, r.params, ro);
    } catch (const ApiError& e) {
      res.status = e.status;
      metrics.http_error(e.status);
      res.set_content(error_body(e.status, e.what(), e.param, e.type, e.code), "application/json");
      return;
    } catch (const QueueFull& e) {
      return send_error(res, 429, e.what());
    } catch (const NotAccepting& e) {
      return send_error(res, 503, e.what());
    } catch (const Error& e) {
      return send_error(res, 400, e.what(), chat ? "messages" : "prompt");  // context overflow, bad params
    }
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(stream->id());
    const uint64_t rid = stream->id();
    if (!r.stream) {
      // Blocks this worker until the request ends; a client that goes away meanwhile cancels it (its blocks free).
      FullResponse full(r, id, unix_now(), opt.model_name, tok);
      const int fd = client_socket(req);
      bool gone = false;
      for (;;) {
        auto events = stream->next(250);
        if (full.feed(events)) break;
        if (!gone && fd >= 0 && peer_closed(fd)) {
          engine.cancel(rid);
          gone = true;
        }
      }
      res.status = full.status();
      if (full.status() != 200) metrics.http_error(full.status());
      res.set_content(full.body(), "application/json");
      return;
    }
    stream_response(req, res, stream, StreamResponse(r, id, unix_now(), opt.model_name, tok), rid);
  }

  // Streaming, written on the socket here rather than through httplib's chunked provider: httplib 0.11 checks
  // before every chunk whether the client has sent EOF, so a client that half-closes after its request (SHUT_WR)
  // would lose its stream. Here only a failed or stalled write means the client is gone (and cancels the request).
  // One SSE event per engine event, queue frames while waiting; the connection ends with the stream.
  void stream_response(const httplib::Request& req, httplib::Response& res,
                       const std::shared_ptr<RequestStream>& stream, StreamResponse resp, uint64_t rid) {
    const int fd = client_socket(req);
    if (fd < 0) {
      engine.cancel(rid);
      return send_error(res, 500, "the connection's socket was not found");
    }
    std::string head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n";
    for (const auto& [k, v] : res.headers) head += k + ": " + v + "\r\n";  // CORS
    bool alive = write_all(fd, head + "\r\n"), done = false;
    int64_t last_position = 0;
    std::chrono::steady_clock::time_point last_frame;
    while (alive && !done) {
      std::string out;
      auto events = stream->next(100);
      done = resp.feed(events, out);
      if (!resp.started()) {
        // Queue frames: when the position changes, and about once a second.
        const auto now = std::chrono::steady_clock::now();
        if (auto q = engine.queue_info(rid);
            q && (q->position != last_position || now - last_frame >= std::chrono::seconds(1))) {
          out += queue_frame(*q);
          last_position = q->position;
          last_frame = now;
        }
      }
      if (!out.empty()) alive = write_all(fd, http_chunk(out));
    }
    if (!done) engine.cancel(rid);
    if (alive) write_all(fd, http_chunk({}));
    // httplib's own write of `res` then fails on the shut socket, and it closes the connection.
    finish_connection(fd);
  }

  void routes() {
    server.new_task_queue = [n = opt.threads] { return new httplib::ThreadPool(size_t(n)); };
    server.set_payload_max_length(opt.max_body_bytes);
    // A client that waits for "100 Continue" before sending an oversized body is told 413 instead, and the connection
    // closes: a client may send the body anyway, which must not be read as its next request.
    server.set_expect_100_continue_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (declared_length(req, opt.max_body_bytes) == BodyRead::kTooLarge) {
        answer_and_close(req, res, 413, too_large());
        return 413;
      }
      return 100;
    });
    server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (answer_cors(req, res)) return httplib::Server::HandlerResponse::Handled;
      // The chat page holds no data: it loads without a key and sends the one the user types with its API calls.
      if (req.path == "/health" || (req.path == "/" && (req.method == "GET" || req.method == "HEAD")))
        return httplib::Server::HandlerResponse::Unhandled;
      if (!authorized(req)) {
        const char* msg = "a valid API key is required (Authorization: Bearer KEY)";
        if (has_body(req)) {
          answer_and_close(req, res, 401, msg, "WWW-Authenticate: Bearer");  // the body is never read
        } else {
          send_error(res, 401, msg);
        }
        res.set_header("WWW-Authenticate", "Bearer");
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // httplib answers 404/413/400 itself with an empty body; give those the OpenAI envelope.
    server.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 404)
        res.set_content(error_body(404, "no such route"), "application/json");
      else if (res.status == 413)
        res.set_content(error_body(413, "the request body exceeds " + std::to_string(opt.max_body_bytes) + " bytes"),
                        "application/json");
      else
        res.set_content(error_body(res.status, "the request was rejected"), "application/json");
    });
    server.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string msg = "internal error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        msg += std::string(": ") + e.what();
      } catch (...) {
      }
      send_error(res, 500, msg);
    });
    server.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"status\":\"ok\"}", "application/json");
    });
    server.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("Content-Security-Policy", kWebPageSecurityPolicy);
      res.set_header("X-Content-Type-Options", "nosniff");
      res.set_header("Referrer-Policy", "no-referrer");
      res.set_content(std::string(web_chat_page()), kWebPageContentType);
    });
    server.Get("/ready", [this](const httplib::Request&, httplib::Response& res) {
      if (draining) return send_error(res, 503, "the server is shutting down");
      res.set_content("{\"status\":\"ready\"}", "application/json");
    });
    server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      QueueStats s = engine.stats();
      res.set_content(metrics.render(s.waiting, s.running, s.kv_used, s.kv_total, s.kv_cached),
                      "text/plain; version=0.0.4; charset=utf-8");
    });
    server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json m{{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "kiln"}};
      res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), "application/json");
    });
    // Every route that takes a body reads it itself, through read_request_body: httplib's own reading (for a route
    // without a content reader) has no limit on chunked or compressed bodies. So unknown paths get a reader too.
    using Reader = httplib::ContentReader;
    server.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& s, const Reader& r) {
      completion(q, s, r, true);
    });
    server.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& s, const Reader& r) {
      completion(q, s, r, false);
    });
    auto no_route = [this](const httplib::Request& q, httplib::Response& s, const Reader& r) {
      std::string unused;
      if (read_request_body(q, s, r, false, unused)) send_error(s, 404, "no such route");
    };
    server.Post(".*", no_route);
    server.Put(".*", no_route);
    server.Patch(".*", no_route);
    server.Delete(".*", no_route);
  }
};

HttpServer::HttpServer(ClaimedPort port, AsyncScheduler& engine, Metrics& metrics, const Tokenizer& tok,
                       const ChatTemplate* tpl, HttpOptions options)
    : impl_(std::make_unique<Impl>(std::move(port), engine, metrics, tok, tpl, std::move(options))) {
  impl_->routes();
}

HttpServer::~HttpServer() = default;

bool HttpServer::run(const std::atomic<bool>& stop_flag) {
  Impl& m = *impl_;
  std::atomic<bool> listener_done{false};
  m.port.impl_->served = true;
  std::thread listener([&] {
    m.server.listen_after_bind();
    listener_done = true;
  });
  // "listening" only once the accept loop runs: scripts wait for this line before they send requests.
  while (!m.server.is_running() && !listener_done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::fprintf(stderr, "kiln serve: listening on http://%s:%d (model %s)\n", m.port.host().c_str(), m.port.port(),
               m.opt.model_name.c_str());
  while (!stop_flag) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  // Drain: no new work, give running requests their time, then cancel what is left and let streams flush. Every
  // wait below ends by the hard deadline, drain_timeout plus a second for the last writes: a connection that still
  // holds a worker then (a client trickling bytes) is abandoned with the process.
  using Clock = std::chrono::steady_clock;
  m.draining = true;
  m.engine.stop_accepting();
  const auto start = Clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(m.opt.drain_timeout));
  const auto hard_deadline = deadline + std::chrono::seconds(1);
  while (!m.engine.idle() && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!m.engine.idle()) m.engine.cancel_all();
  const auto flushed = std::min(hard_deadline, Clock::now() + std::chrono::milliseconds(500));
  while (!m.engine.idle() && Clock::now() < flushed) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_until(std::min(hard_deadline, Clock::now() + std::chrono::milliseconds(300)));
  m.server.stop();  // closes the listening socket; the listener then waits for the connections' workers
  while (!listener_done && Clock::now() < hard_deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (!listener_done) {
    listener.detach();
    return false;
  }
  listener.join();
  return true;
}

}  // namespace kiln::serve
