// kiln serve PATH [--host H] [--port P] [--api-key K]... [--max-queue N] [--max-batch-tokens T] ...: an
// OpenAI-compatible HTTP server over the scheduler (runtime/engine/scheduler.h, on its thread in runtime/serve). Thin:
// options, the port, loading, signals. The port is claimed before anything loads: a second server on a port in use
// fails at once, and clients that connect while the model loads wait until it answers.
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "runtime/core/error.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"
#include "tools/flag_checks.h"
#include "tools/generation_cli.h"
#ifdef KILN_HAVE_HTTPLIB
#include "runtime/serve/cors.h"
#include "runtime/serve/http_server.h"
#endif

namespace kiln::tools {
namespace {

struct ServeCliOptions {
  std::string path, host = "127.0.0.1", model_name, kv_cache = "auto", prefix_cache_salt = "per-key", chat_template;
  bool no_prefix_cache = false;
  int port = 8000;
  std::vector<std::string> api_keys, allow_origins;
  int64_t max_queue = 256, max_batch_tokens = 512, max_running = 64, kv_cache_blocks = 0, ctx = 0;
  int64_t kv_cache_mib = 1024;
  double kv_cache_fraction = 0;
  size_t max_body_bytes = 8 << 20;
  double drain_timeout = 30;
  unsigned threads = 0;
  bool verify = false;
};

std::atomic<bool> g_stop{false};
std::atomic<bool> g_loading{true};  // until the server answers: nothing to drain, and loading can take minutes
// While loading, SIGINT/SIGTERM exit at once (status 0, as a drained server does). Then the first one drains; a
// second one means "now": exit at once (only async-signal-safe calls here).
extern "C" void on_stop_signal(int) {
  if (g_loading) {
    static const char msg[] = "kiln serve: stopped while loading the model\n";
    [[maybe_unused]] const ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(0);
  }
  if (g_stop.exchange(true)) {
    static const char msg[] = "kiln serve: second signal: exiting without draining\n";
    [[maybe_unused]] const ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(1);
  }
}

int run(const ServeCliOptions& o) {
#ifndef KILN_HAVE_HTTPLIB
  (void)o;
  throw Error("kiln serve: this build has no HTTP server (cpp-httplib was not found at build time)");
#else
  // SIGTERM/SIGINT drain the server (see HttpServer::run); a write to a closed socket must not kill the process.
  std::signal(SIGPIPE, SIG_IGN);
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  const serve::CorsPolicy cors_check(o.allow_origins);  // a malformed --allow-origin fails before loading
  serve::ClaimedPort port(o.host, o.port);
  std::fprintf(stderr, "kiln serve: claimed %s:%d; loading %s\n", port.host().c_str(), port.port(), o.path.c_str());
  LoadedModel m = load_model(o.path, o.threads, o.verify);
  const ModelSpec& spec = m.model->spec();
  TokenizerFiles files = locate_tokenizer_files(o.path);
  Tokenizer tok = Tokenizer::load(files);
  std::unique_ptr<ChatTemplate> tpl;
  if (!o.chat_template.empty()) {
    tpl = std::make_unique<ChatTemplate>(load_chat_template(files, o.chat_template));  // a bad flag stops here
  } else
    try {
      tpl = std::make_unique<ChatTemplate>(load_chat_template(files, ""));
    } catch (const Error& e) {
      std::fprintf(stderr, "kiln serve: %s; /v1/chat/completions will answer 400\n", e.what());
    }
  const int64_t context = o.ctx > 0 ? o.ctx : spec.max_position_embeddings;
  const KvDType kv = resolve_kv_dtype(*m.workspace, o.kv_cache);
  const int64_t block = 16;
  KvCacheConfig probe = m.model->kv_config(block, kv, block);
  int64_t blocks = o.kv_cache_blocks;
  // A device backend can budget the cache as a share of its free memory (after the weights are on it).
  size_t budget = size_t(o.kv_cache_mib) << 20;
  if (o.kv_cache_fraction > 0) {
    const size_t free_b = m.model->backend().free_memory();
    if (free_b == 0)
      throw Error("--kv-cache-fraction needs a device backend (KILN_DEVICE=cuda); on the CPU use --kv-cache-mib");
    budget = size_t(double(free_b) * o.kv_cache_fraction);
  }
  if (blocks <= 0)  // from the memory budget, but always room for one full-context request
    blocks =
        std::max<int64_t>((context + block - 1) / block, int64_t(budget / (KvCache::bytes_per_token(probe) * block)));
  KvCache cache(m.model->backend(), m.model->kv_config(blocks * block, kv, block));

  serve::Metrics metrics;
  SchedulerOptions so;
  so.context = context;
  so.max_batch_tokens = o.max_batch_tokens;
  so.max_running = o.max_running;
  so.max_queue = o.max_queue;
  so.eos_ids = eos_ids(spec.eos_token_ids);
  so.tokenizer = &tok;
  so.prefix_cache = !o.no_prefix_cache;
  serve::AsyncScheduler scheduler(*m.model, cache, so, metrics);

  serve::HttpOptions ho;
  ho.api_keys = o.api_keys;
  ho.max_body_bytes = o.max_body_bytes;
  ho.drain_timeout = o.drain_timeout;
  ho.context = context;
  ho.allow_origins = o.allow_origins;
  ho.cache_salt_per_key = o.prefix_cache_salt == "per-key";
  ho.model_name =
      o.model_name.empty() ? std::filesystem::path(o.path).lexically_normal().filename().string() : o.model_name;
  if (ho.model_name.empty()) ho.model_name = std::filesystem::path(o.path).parent_path().filename().string();
  serve::HttpServer server(std::move(port), scheduler, metrics, tok, tpl.get(), ho);
  std::fprintf(stderr, "kiln serve: %lld KV blocks of %lld tokens, context %lld\n", (long long)blocks, (long long)block,
               (long long)context);
  g_loading = false;  // a signal from here on drains (run() checks g_stop first thing)
  if (!server.run(g_stop)) {
    // Connections still held workers at the drain deadline (clients trickling bytes): the deadline is hard, so the
    // process ends now rather than waiting for them.
    std::fprintf(stderr, "kiln serve: connections still open at the drain deadline; exiting\n");
    std::fflush(stderr);
    std::_Exit(0);
  }
  return 0;
#endif
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<ServeCliOptions>();
  sub.add_option("PATH", o->path, "Workspace, or a Hugging Face checkpoint directory (converted in memory)")
      ->required();
  sub.add_option("--host", o->host, "Address to listen on")->capture_default_str();
  sub.add_option("--port", o->port, "Port to listen on (0: any free port, printed at start)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  sub.add_option(
      "--chat-template", o->chat_template,
      "Chat template instead of the model's: a Jinja file, or a built-in (" + builtin_chat_template_names() + ")");
  sub.add_option("--api-key", o->api_keys, "Accepted API key (repeatable); none: no authentication");
  sub.add_option("--allow-origin", o->allow_origins,
                 "Origin (scheme://host[:port]) whose pages may call the API from a browser (CORS; repeatable, or *)");
  // Every numeric flag is range-checked here, so a bad value is a usage error (exit 2) before anything loads.
  const auto count = CLI::Range(int64_t(1), int64_t(1) << 40);
  sub.add_option("--max-queue", o->max_queue, "Waiting requests beyond which new ones get 429")
      ->check(count)
      ->capture_default_str();
  sub.add_option("--max-batch-tokens", o->max_batch_tokens, "Most tokens per forward pass")
      ->check(count)
      ->capture_default_str();
  sub.add_option("--max-running", o->max_running, "Most requests in the running batch")
      ->check(count)
      ->capture_default_str();
  sub.add_option("--kv-cache-blocks", o->kv_cache_blocks, "KV cache blocks of 16 tokens (default: from --kv-cache-mib)")
      ->check(count);
  sub.add_option("--kv-cache-mib", o->kv_cache_mib, "KV cache memory budget in MiB")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30))
      ->capture_default_str();
  sub.add_option("--kv-cache-fraction", o->kv_cache_fraction,
                 "KV cache budget as a fraction of the device's free memory after loading (KILN_DEVICE=cuda; "
                 "overrides --kv-cache-mib)")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            size_t used = 0;
            double x = 0;
            try {
              x = std::stod(v, &used);
            } catch (const std::exception&) {
              used = 0;
            }
            return used == v.size() && x > 0 && x < 1 ? std::string() : "must be in (0, 1), not " + v;
          },
          "in (0, 1)"));
  sub.add_option("--kv-cache", o->kv_cache, kKvCacheFlagHelp)->capture_default_str();
  sub.add_option("--ctx", o->ctx, "Context length per request (default: the model's maximum)")->check(count);
  sub.add_option("--max-body-bytes", o->max_body_bytes,
                 "Largest request body, after decompression and de-chunking (413 beyond)")
      ->check(CLI::Range(size_t(1), size_t(1) << 40))
      ->capture_default_str();
  sub.add_option("--model-name", o->model_name, "Model id reported by the API (default: the directory name)");
  sub.add_option("--drain-timeout", o->drain_timeout,
                 "Seconds to finish running requests after SIGTERM (a second signal exits at once)")
      ->check(finite_range(0, 86400))
      ->capture_default_str();
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")->check(CLI::Range(0u, 4096u));
  sub.add_flag("--verify", o->verify, kVerifyFlagHelp);
  sub.add_flag("--no-prefix-cache", o->no_prefix_cache,
               "Do not reuse the KV blocks of earlier requests that start with the same tokens");
  sub.add_option("--prefix-cache-salt", o->prefix_cache_salt,
                 "per-key: requests reuse cached prefixes only of requests made with the same API key; none: all "
                 "requests share them")
      ->check(CLI::IsMember({"per-key", "none"}))
      ->capture_default_str();
  return [o] { return run(*o); };
}

}  // namespace

KILN_COMMAND(80, "serve", "Serve the model over an OpenAI-compatible HTTP API", setup);

}  // namespace kiln::tools
