// kiln generate PATH --prompt T [--chat] [-n N] [--json]: greedy continuation of a prompt, streamed to stdout.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "runtime/core/error.h"
#include "runtime/engine/generate.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/text/chat_template.h"
#include "runtime/text/detokenizer.h"
#include "runtime/text/tokenizer.h"
#include "tools/command.h"

namespace kiln::tools {
namespace {

struct GenerateCliOptions {
  std::string path, prompt, prompt_tokens, kv_cache = "auto";
  bool chat = false, json = false;
  int64_t max_new_tokens = 128, ctx = 0;
  unsigned threads = 0;
};

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int run(const GenerateCliOptions& o) {
  LoadedModel m = load_model(o.path, o.threads);
  const ModelSpec& spec = m.model->spec();
  TokenizerFiles files = locate_tokenizer_files(o.path);
  Tokenizer tok = Tokenizer::load(files);
  std::vector<int32_t> prompt;
  if (!o.prompt_tokens.empty()) {
    auto j = nlohmann::json::parse(read_text(o.prompt_tokens), nullptr, false);
    if (j.is_discarded() || !j.is_array()) throw Error(o.prompt_tokens + ": expected a JSON list of token ids");
    for (const auto& v : j) {
      if (!v.is_number_integer()) throw Error(o.prompt_tokens + ": expected integer token ids, got " + v.dump());
      prompt.push_back(v.get<int32_t>());
    }
  } else if (o.chat) {
    // As transformers' apply_chat_template(tokenize=True): the template supplies the special tokens.
    ChatTemplate tpl = ChatTemplate::from_files(files);
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    messages.push_back({{"role", "user"}, {"content", o.prompt}});
    prompt = tok.encode(tpl.render(messages, true), false);
  } else {
    prompt = tok.encode(o.prompt);
  }

  GenerateOptions g;
  g.max_new_tokens = o.max_new_tokens;
  g.context = o.ctx;
  g.stop_ids = spec.eos_token_ids;
  g.kv_dtype = o.kv_cache == "auto" ? default_kv_dtype(*m.workspace) : kv_dtype_from_name(o.kv_cache, "--kv-cache");

  IncrementalDetokenizer detok(tok, true);
  std::string text;
  auto emit = [&](const std::string& piece) {
    text += piece;
    if (!o.json && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  GenerateResult r = generate(*m.model, prompt, g, nullptr, [&](int32_t id) { emit(detok.push(id)); });
  emit(detok.finish());
  if (o.json) {
    nlohmann::ordered_json out{{"text", text},
                               {"token_ids", r.tokens},
                               {"prompt_tokens", prompt.size()},
                               {"completion_tokens", r.tokens.size()},
                               {"finish_reason", r.finish_reason}};
    print_json(out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } else {
    std::fputc('\n', stdout);
  }
  return 0;
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<GenerateCliOptions>();
  sub.add_option("PATH", o->path, "Workspace")->required();
  auto* input = sub.add_option_group("input", "Exactly one of --prompt and --tokens");
  input->add_option("--prompt", o->prompt, "Prompt text (invalid UTF-8 becomes U+FFFD)");
  input->add_option("--tokens", o->prompt_tokens, "JSON file with the prompt as a list of token ids");
  input->require_option(1);
  sub.add_flag("--chat", o->chat, "Wrap the prompt as one user message in the model's chat template");
  sub.add_option("-n,--max-new-tokens", o->max_new_tokens, "Most tokens to generate")->capture_default_str();
  sub.add_option("--ctx", o->ctx, "Context length: prompt plus completion (default: the model's maximum)");
  sub.add_option("--kv-cache", o->kv_cache, "KV cache dtype: auto (the workspace's), fp32, fp16 or bf16")
      ->capture_default_str();
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)");
  sub.add_flag("--json", o->json,
               "Print {\"text\", \"token_ids\", \"prompt_tokens\", \"completion_tokens\", \"finish_reason\"}");
  return [o] { return run(*o); };
}

}  // namespace

KILN_COMMAND(50, "generate", "Continue a prompt with greedy decoding", setup);

}  // namespace kiln::tools
