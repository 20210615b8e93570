#include "runtime/serve/http_server.h"

#include <httplib.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "runtime/core/error.h"
#include "runtime/serve/cors.h"
#include "runtime/serve/http_api.h"
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
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string sse(const json& j) {
  return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

}  // namespace

struct HttpServer::Impl {
  Engine& engine;
  Metrics& metrics;
  const Tokenizer& tok;
  const ChatTemplate* tpl;
  HttpOptions opt;
  httplib::Server server;
  std::atomic<bool> draining{false};
  std::atomic<uint64_t> next_id{1};
  CorsPolicy cors;

  Impl(Engine& e, Metrics& m, const Tokenizer& t, const ChatTemplate* c, HttpOptions o)
      : engine(e), metrics(m), tok(t), tpl(c), opt(std::move(o)), cors(opt.allow_origins) {}

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

  void send_error(httplib::Response& res, int status, const std::string& msg, const std::string& param = {}) {
    res.status = status;
    metrics.http_error(status);
    if (status == 429) res.set_header("Retry-After", "1");
    res.set_content(error_body(status, msg, param), "application/json");
  }

  bool authorized(const httplib::Request& req) {
    if (opt.api_keys.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (h.size() <= prefix.size() || h.compare(0, prefix.size(), prefix) != 0) return false;
    const std::string key = h.substr(prefix.size());
    bool ok = false;
    for (const auto& k : opt.api_keys) ok |= equal_constant_time(key, k);  // no early exit over keys either
    return ok;
  }

  void completion(const httplib::Request& req, httplib::Response& res, bool chat) {
    if (draining) return send_error(res, 503, "the server is shutting down");
    ApiRequest r;
    std::shared_ptr<RequestStream> stream;
    try {
      r = parse_request(req.body, chat, tok, tpl);
      stream = engine.submit(r.prompt, r.params);
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
    const int64_t created = unix_now();
    const std::string model = opt.model_name;
    if (!r.stream) {
      // Blocks this worker until the request ends. A client that goes away is not noticed until then.
      std::string text;
      for (;;) {
        bool done = false;
        for (Event& e : stream->next(1000)) {
          text += e.text;
          if (e.finished) {
            if (e.finish_reason == "error") return send_error(res, 500, "generation failed: " + e.error);
            if (e.finish_reason == "cancelled") return send_error(res, 503, "the request was cancelled");
            res.set_content(full_response(r, id, created, model, text, e.finish_reason, e.prompt_tokens,
                                          e.completion_tokens)
                                .dump(-1, ' ', false, json::error_handler_t::replace),
                            "application/json");
            done = true;
          }
        }
        if (done) return;
      }
    }
    // Streaming: one SSE event per engine event. The provider runs on this worker; a failed write (client gone) makes
    // httplib call the releaser with success=false, which cancels the request and so frees its KV blocks.
    struct State {
      bool first = true, done = false;
    };
    auto st = std::make_shared<State>();
    Engine* eng = &engine;
    const uint64_t rid = stream->id();
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [r, id, created, model, stream, st](size_t, httplib::DataSink& sink) {
          if (st->done) return false;
          std::string out;
          for (Event& e : stream->next(100)) {
            // Chat streams open with the role; after that, only events that carry text become chunks.
            if (!e.text.empty() || (st->first && r.chat)) {
              out += sse(stream_chunk(r, id, created, model, e.text, st->first, ""));
              st->first = false;
            }
            if (!e.finished) continue;
            if (e.finish_reason == "error")
              out += sse(json::parse(error_body(500, "generation failed: " + e.error)));
            else
              out += sse(stream_chunk(r, id, created, model, "", false, e.finish_reason));
            if (r.include_usage) out += sse(usage_chunk(r, id, created, model, e.prompt_tokens, e.completion_tokens));
            out += "data: [DONE]\n\n";
            st->done = true;
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) return false;
          if (st->done) sink.done();
          return true;
        },
        [eng, rid, st](bool) {
          if (!st->done) eng->cancel(rid);
        });
  }

  void routes() {
    server.new_task_queue = [n = opt.threads] { return new httplib::ThreadPool(size_t(n)); };
    server.set_payload_max_length(opt.max_body_bytes);
    server.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (answer_cors(req, res)) return httplib::Server::HandlerResponse::Handled;
      // The chat page holds no data: it loads without a key and sends the one the user types with its API calls.
      if (req.path == "/health" || (req.path == "/" && (req.method == "GET" || req.method == "HEAD")))
        return httplib::Server::HandlerResponse::Unhandled;
      if (!authorized(req)) {
        send_error(res, 401, "a valid API key is required (Authorization: Bearer KEY)");
        res.set_header("WWW-Authenticate", "Bearer");
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // httplib answers 404/413/400 itself with an empty body; give those the OpenAI envelope.
    server.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 404) res.set_content(error_body(404, "no such route"), "application/json");
      else if (res.status == 413)
        res.set_content(error_body(413, "the request body exceeds " + std::to_string(opt.max_body_bytes) + " bytes"),
                        "application/json");
      else res.set_content(error_body(res.status, "the request was rejected"), "application/json");
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
      EngineStats s = engine.stats();
      res.set_content(metrics.render(s.waiting, s.running, s.kv_used, s.kv_total), "text/plain; version=0.0.4");
    });
    server.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json m{{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "kiln"}};
      res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), "application/json");
    });
    server.Post("/v1/chat/completions",
                [this](const httplib::Request& q, httplib::Response& s) { completion(q, s, true); });
    server.Post("/v1/completions",
                [this](const httplib::Request& q, httplib::Response& s) { completion(q, s, false); });
  }
};

HttpServer::HttpServer(Engine& engine, Metrics& metrics, const Tokenizer& tok, const ChatTemplate* tpl,
                       HttpOptions options)
    : impl_(std::make_unique<Impl>(engine, metrics, tok, tpl, std::move(options))) {
  impl_->routes();
}

HttpServer::~HttpServer() = default;

void HttpServer::run(const std::atomic<bool>& stop_flag) {
  Impl& m = *impl_;
  if (!m.server.bind_to_port(m.opt.host, m.opt.port))
    throw Error("cannot listen on " + m.opt.host + ":" + std::to_string(m.opt.port) + " (in use or not permitted)");
  std::thread listener([&] { m.server.listen_after_bind(); });
  std::fprintf(stderr, "kiln serve: listening on http://%s:%d (model %s)\n", m.opt.host.c_str(), m.opt.port,
               m.opt.model_name.c_str());
  while (!stop_flag) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  // Drain: no new work, give running requests their time, then cancel what is left and let streams flush.
  m.draining = true;
  m.engine.stop_accepting();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(m.opt.drain_timeout);
  while (!m.engine.idle() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!m.engine.idle()) m.engine.cancel_all();
  for (int i = 0; i < 100 && !m.engine.idle(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let open streams write their last events
  m.server.stop();
  listener.join();
}

}  // namespace kiln::serve
