#pragma once
// `kiln serve`'s HTTP front: OpenAI-compatible routes over cpp-httplib, API keys, health/readiness, metrics, and
// graceful draining. The engine does the work; this file only translates.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/serve/async_scheduler.h"
#include "runtime/serve/metrics.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::serve {

// The server's port, claimed before the model loads: bound and listening (with a deep accept queue), so that a second
// server on it fails at once, before loading anything. Connections that arrive meanwhile wait in the kernel's accept
// queue, unanswered, until HttpServer::run starts answering them.
class ClaimedPort {
 public:
  // Port 0: any free port. Throws kiln::Error "cannot listen on HOST:PORT: address already in use" (or why else the
  // bind failed).
  ClaimedPort(const std::string& host, int port);
  ClaimedPort(ClaimedPort&&) noexcept;
  ~ClaimedPort();  // closes the socket if no server ever answered on it
  const std::string& host() const;
  int port() const;  // the bound port, also for port 0

 private:
  friend class HttpServer;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct HttpOptions {
  std::vector<std::string> api_keys;  // empty: no authentication
  size_t max_body_bytes = 8 << 20;
  std::string model_name;
  double drain_timeout = 30;               // seconds to finish running requests after SIGTERM before cancelling them
  int64_t context = 0;                     // positions per request: prompts that cannot fit are refused untokenized
  int threads = 256;                       // HTTP worker threads: each open stream holds one
  std::vector<std::string> allow_origins;  // CORS (--allow-origin): origins or "*"; empty: no CORS headers
  bool cache_salt_per_key = true;          // prefix cache salt = the request's API key (tenants never share blocks)
};

class HttpServer {
 public:
  HttpServer(ClaimedPort port, AsyncScheduler& engine, Metrics& metrics, const Tokenizer& tok,
             const ChatTemplate* chat_template, HttpOptions options);
  ~HttpServer();
  // Answers on the claimed port (connections already waiting first) and says "listening" on stderr once it does;
  // serves until stop_flag turns true; then drains: refuses new requests with 503, lets running ones finish for
  // up to drain_timeout, cancels the rest, and returns within drain_timeout + 1 s. False: connections still held
  // workers at that deadline; the caller must then end the process without destroying this object (_Exit).
  bool run(const std::atomic<bool>& stop_flag);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kiln::serve
