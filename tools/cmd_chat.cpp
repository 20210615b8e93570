// kiln chat PATH [--system S] [--show-prompt] [sampling flags]: an interactive, streaming, multi-turn chat.
//
// Each turn renders the whole conversation with the chat template (byte-exact with transformers) and tokenizes it;
// the session's cache keeps the longest common token prefix with the previous turns, so only the new part is
// prefilled. Ctrl-C stops the answer being generated and returns to the prompt (a second Ctrl-C while idle exits).
// With stdin or stdout not a terminal it reads one message per line until EOF and prints only the answers, one per
// line, to stdout; statistics always go to stderr.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "runtime/core/error.h"
#include "runtime/engine/batch_generate.h"
#include "runtime/engine/chat_session.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/interrupt.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"
#include "tools/flag_checks.h"
#include "tools/generation_cli.h"

namespace kiln::tools {
namespace {

struct ChatCliOptions {
  std::string path, system, kv_cache = "auto", chat_template;
  bool show_prompt = false;
  int64_t ctx = 0;
  unsigned threads = 0;
  bool verify = false;
  SamplingFlags sampling;
};

void write_out(std::string_view s) {
  std::fwrite(s.data(), 1, s.size(), stdout);
  std::fflush(stdout);
}

class Repl {
 public:
  Repl(const ChatCliOptions& o) : o_(o), interactive_(::isatty(STDIN_FILENO) && ::isatty(STDOUT_FILENO)) {}

  int run() {
    m_ = load_model(o_.path, o_.threads, o_.verify);
    files_ = locate_tokenizer_files(o_.path);
    tok_ = std::make_unique<Tokenizer>(Tokenizer::load(files_));
    tpl_ = std::make_unique<ChatTemplate>(load_chat_template(files_, o_.chat_template));
    params_ = resolve_sampling(o_.sampling, read_generation_config(files_));
    const ModelSpec& spec = m_.model->spec();
    context_ = o_.ctx > 0 ? o_.ctx : spec.max_position_embeddings;
    const KvDType kv = resolve_kv_dtype(*m_.workspace, o_.kv_cache);
    session_ = std::make_unique<ChatSession>(*m_.model, context_, kv);
    system_ = o_.system;
    if (interactive_)
      std::fprintf(stderr,
                   "kiln chat: %s (%s sampling). /reset clears the conversation, /system TEXT sets the system "
                   "prompt, /exit or Ctrl-D quits; Ctrl-C stops an answer.\n",
                   spec.architecture.c_str(), params_.greedy() ? "greedy" : "random");

    std::string line;
    for (;;) {
      if (interactive_) write_out("\033[1m> \033[0m");
      if (!std::getline(std::cin, line)) break;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) continue;
      if (line == "/exit" || line == "/quit") break;
      if (line == "/reset") {
        turns_ = nlohmann::ordered_json::array();
        session_->reset();
        std::fprintf(stderr, "[conversation reset]\n");
        continue;
      }
      if (line == "/system" || line.rfind("/system ", 0) == 0) {
        // The history stays; the next turn re-renders it under the new system prompt and the prefix match
        // recomputes whatever changed.
        system_ = line.size() > 8 ? line.substr(8) : std::string();
        std::fprintf(stderr, "[system prompt %s]\n", system_.empty() ? "cleared" : "set");
        continue;
      }
      answer(line);
    }
    if (interactive_) write_out("\n");
    return 0;
  }

 private:
  nlohmann::ordered_json conversation() const {
    nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
    if (!system_.empty()) msgs.push_back({{"role", "system"}, {"content", system_}});
    for (const auto& t : turns_) msgs.push_back(t);
    return msgs;
  }

  void answer(const std::string& user) {
    turns_.push_back({{"role", "user"}, {"content", user}});
    GenerationRequest q;
    try {
      const std::string rendered = tpl_->render(conversation(), true);
      if (o_.show_prompt) std::fprintf(stderr, "[prompt]\n%s[/prompt]\n", rendered.c_str());
      q.prompt = tok_->encode(rendered, false);
      if (int64_t(q.prompt.size()) > context_)
        throw Error("the conversation has " + std::to_string(q.prompt.size()) + " tokens, more than the context of " +
                    std::to_string(context_) + " tokens; /reset to start over");
    } catch (const Error& e) {
      turns_.erase(turns_.size() - 1);
      std::fprintf(stderr, "kiln chat: %s\n", e.what());
      return;
    }
    const int64_t reused = session_->reuse_prefix(q.prompt);
    q.kv = &session_->sequence();
    q.params = params_;
    if (params_.seed) q.params.seed = *params_.seed + turn_count_;  // reproducible, yet not the same draw each turn
    q.on_text = write_out;
    BatchOptions bo;
    bo.context = context_;
    bo.eos_ids = eos_ids(m_.model->spec().eos_token_ids);
    bo.tokenizer = tok_.get();
    bo.cancelled = [] { return interrupt_requested(); };

    clear_interrupt();  // a Ctrl-C typed at the prompt must not stop this answer
    GenerationOutput r;
    try {
      std::span<GenerationRequest> one(&q, 1);
      r = generate_batch(*m_.model, session_->cache(), one, bo)[0];
    } catch (const Error& e) {
      session_->reset();  // the cache may hold a half-written turn; start the next one from scratch
      turns_.erase(turns_.size() - 1);
      write_out("\n");
      std::fprintf(stderr, "kiln chat: %s\n", e.what());
      return;
    }
    clear_interrupt();
    write_out("\n");
    session_->record(q.prompt, r.tokens);
    // Even a stopped answer stays in the history: it is what the user saw.
    turns_.push_back({{"role", "assistant"}, {"content", r.text}});
    ++turn_count_;
    const double decode_s = r.end_seconds - r.first_token_seconds;
    const int64_t n = int64_t(r.tokens.size());
    std::fprintf(stderr, "[%s%lld tokens, %.1f tokens/s; prompt %lld tokens, %lld reused, %.0f ms to first token]\n",
                 r.finish_reason == "cancelled" ? "interrupted, " : "", (long long)n,
                 n > 1 && decode_s > 0 ? double(n - 1) / decode_s : 0.0, (long long)q.prompt.size(), (long long)reused,
                 r.first_token_seconds * 1e3);
  }

  const ChatCliOptions& o_;
  bool interactive_;
  LoadedModel m_;
  TokenizerFiles files_;
  std::unique_ptr<Tokenizer> tok_;
  std::unique_ptr<ChatTemplate> tpl_;
  SamplingParams params_;
  int64_t context_ = 0;
  std::unique_ptr<ChatSession> session_;
  std::string system_;
  nlohmann::ordered_json turns_ = nlohmann::ordered_json::array();
  uint64_t turn_count_ = 0;
};

Action setup(CLI::App& sub) {
  auto o = std::make_shared<ChatCliOptions>();
  sub.add_option("PATH", o->path, "Workspace, or a Hugging Face checkpoint directory (converted in memory)")
      ->required();
  sub.add_option("--system", o->system, "System prompt");
  sub.add_option(
      "--chat-template", o->chat_template,
      "Chat template instead of the model's: a Jinja file, or a built-in (" + builtin_chat_template_names() + ")");
  sub.add_flag("--show-prompt", o->show_prompt, "Print each turn's rendered prompt to stderr");
  add_sampling_flags(sub, o->sampling);
  sub.add_option("--ctx", o->ctx, "Context length of the conversation (default: the model's maximum)")
      ->check(int_range(0, kMaxTokens));
  sub.add_option("--kv-cache", o->kv_cache, kKvCacheFlagHelp)->capture_default_str();
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")
      ->check(int_range(0, kMaxThreads));
  sub.add_flag("--verify", o->verify, kVerifyFlagHelp);
  return [o] { return Repl(*o).run(); };
}

}  // namespace

KILN_COMMAND(55, "chat", "Interactive multi-turn chat with streaming output", setup);

}  // namespace kiln::tools
