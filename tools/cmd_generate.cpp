// kiln generate PATH (--prompt T | --tokens T.json | --messages M.json) [--chat] [-n N] [sampling flags] [--json]:
// continues a prompt, streaming the text to stdout as it decodes. --batch B runs B copies of the prompt (seeds
// seed, seed+1, ...) as one ragged batch: it shows that neighbours do not change a sequence, and measures throughput.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/engine/batch_generate.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/path_safety.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"
#include "tools/flag_checks.h"
#include "tools/generation_cli.h"

namespace kiln::tools {
namespace {

struct GenerateCliOptions {
  std::string path, prompt, prompt_tokens, messages, kv_cache = "auto", chat_template;
  bool chat = false, json = false;
  int64_t ctx = 0, batch = 1, prefill_chunk = 512;
  unsigned threads = 0;
  bool verify = false;
  SamplingFlags sampling;
};

std::string read_text(const std::string& path) {
  require_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json parse_json_file(const std::string& path, const char* what) {
  const std::string text = read_text(path);
  check_json_depth(text, path);
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array()) throw Error(path + ": expected a JSON list of " + what);
  return j;
}

std::vector<int32_t> build_prompt(const GenerateCliOptions& o, const TokenizerFiles& files, const Tokenizer& tok) {
  std::vector<int32_t> prompt;
  if (!o.prompt_tokens.empty()) {
    for (const auto& v : parse_json_file(o.prompt_tokens, "token ids")) {
      if (!v.is_number_integer())
        throw Error(o.prompt_tokens + ": expected integer token ids, got " + one_line_excerpt(v.dump(), 100));
      prompt.push_back(v.get<int32_t>());
    }
    return prompt;
  }
  if (!o.messages.empty() || o.chat) {
    ChatTemplate tpl = load_chat_template(files, o.chat_template);
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    if (!o.messages.empty()) {
      const std::string text = read_text(o.messages);
      check_json_depth(text, o.messages);  // the messages are copied and converted recursively
      auto j = nlohmann::ordered_json::parse(text, nullptr, false);
      if (j.is_discarded() || !j.is_array()) throw Error(o.messages + ": expected a JSON list of messages");
      messages = j;
    } else {
      messages.push_back({{"role", "user"}, {"content", o.prompt}});
    }
    return encode_chat(tok, tpl, messages);
  }
  return tok.encode(o.prompt);
}

nlohmann::ordered_json sequence_json(const GenerationOutput& r) {
  return {{"text", r.text},
          {"token_ids", r.tokens},
          {"prompt_tokens", r.prompt_tokens},
          {"completion_tokens", r.tokens.size()},
          {"finish_reason", r.finish_reason},
          {"seed", r.seed}};
}

int run(const GenerateCliOptions& o) {
  if (o.batch < 1) throw Error("--batch must be >= 1");
  LoadedModel m = load_model(o.path, o.threads, o.verify);
  const ModelSpec& spec = m.model->spec();
  TokenizerFiles files = locate_tokenizer_files(o.path);
  Tokenizer tok = Tokenizer::load(files);
  std::vector<int32_t> prompt = build_prompt(o, files, tok);
  SamplingParams params = resolve_sampling(o.sampling, read_generation_config(files));

  const int64_t context = o.ctx > 0 ? o.ctx : spec.max_position_embeddings;
  const KvDType kv = resolve_kv_dtype(*m.workspace, o.kv_cache);
  // Room for every sequence's prompt + completion, each rounded up to whole blocks.
  const int64_t block = 16;
  const int64_t per_seq = std::min<int64_t>(int64_t(prompt.size()) + params.max_new_tokens, context);
  KvCache cache(m.model->backend(), m.model->kv_config(o.batch * ((per_seq + block - 1) / block) * block, kv, block));

  const bool stream = !o.json && o.batch == 1;
  std::vector<GenerationRequest> requests(size_t(o.batch));
  for (int64_t i = 0; i < o.batch; ++i) {
    GenerationRequest& q = requests[size_t(i)];
    q.prompt = prompt;
    q.params = params;
    if (params.seed) q.params.seed = *params.seed + uint64_t(i);
    if (stream)
      q.on_text = [](std::string_view piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      };
  }
  BatchOptions bo;
  bo.context = context;
  bo.prefill_chunk = o.prefill_chunk;
  bo.eos_ids = eos_ids(spec.eos_token_ids);
  bo.tokenizer = &tok;
  std::vector<GenerationOutput> out = generate_batch(*m.model, cache, requests, bo);

  // Throughput over the whole batch: prefill until the last first token, decode after it.
  double first = 0, end = 0;
  int64_t decoded = 0;
  for (const auto& r : out) {
    first = std::max(first, r.first_token_seconds);
    end = std::max(end, r.end_seconds);
    decoded += std::max<int64_t>(0, int64_t(r.tokens.size()) - 1);
  }
  nlohmann::ordered_json timing{{"prefill_tokens", int64_t(prompt.size()) * o.batch},
                                {"prefill_seconds", first},
                                {"decode_tokens", decoded},
                                {"decode_seconds", end - first},
                                {"decode_tokens_per_s", end > first ? double(decoded) / (end - first) : 0.0}};
  if (o.json) {
    nlohmann::ordered_json doc;
    if (o.batch == 1) {
      doc = sequence_json(out[0]);
    } else {
      doc["sequences"] = nlohmann::ordered_json::array();
      for (const auto& r : out) doc["sequences"].push_back(sequence_json(r));
    }
    doc["prompt_token_ids"] = prompt;  // what the template and tokenizer made of the input, for checking
    doc["timing"] = timing;
    print_json(doc.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  } else if (stream) {
    std::fputc('\n', stdout);
  } else {
    for (const auto& r : out) std::printf("%s\n", r.text.c_str());
  }
  return 0;
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<GenerateCliOptions>();
  sub.add_option("PATH", o->path, "Workspace, or a Hugging Face checkpoint directory (converted in memory)")
      ->required();
  auto* input = sub.add_option_group("input", "Exactly one of --prompt, --tokens and --messages");
  input->add_option("--prompt", o->prompt, "Prompt text (invalid UTF-8 becomes U+FFFD)");
  input->add_option("--tokens", o->prompt_tokens, "JSON file with the prompt as a list of token ids");
  input->add_option("--messages", o->messages, "JSON file with a list of chat messages, rendered with the template");
  input->require_option(1);
  sub.add_flag("--chat", o->chat, "Wrap the prompt as one user message in the model's chat template");
  sub.add_option(
      "--chat-template", o->chat_template,
      "Chat template instead of the model's: a Jinja file, or a built-in (" + builtin_chat_template_names() + ")");
  add_sampling_flags(sub, o->sampling);
  sub.add_option("--ctx", o->ctx, "Context length: prompt plus completion (default: the model's maximum)")
      ->check(int_range(0, kMaxTokens));
  sub.add_option("--kv-cache", o->kv_cache, kKvCacheFlagHelp)->capture_default_str();
  sub.add_option("--batch", o->batch, "Run this many copies of the prompt in one batch (seeds seed, seed+1, ...)")
      ->capture_default_str()
      ->check(int_range(1, 65536));
  sub.add_option("--prefill-chunk", o->prefill_chunk, "Most prompt tokens per forward pass")
      ->capture_default_str()
      ->check(int_range(1, kMaxTokens));
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")
      ->check(int_range(0, kMaxThreads));
  sub.add_flag("--verify", o->verify, kVerifyFlagHelp);
  sub.add_flag("--json", o->json,
               "Print {\"text\", \"token_ids\", \"prompt_tokens\", \"completion_tokens\", \"finish_reason\", "
               "\"seed\", \"timing\"}");
  return [o] { return run(*o); };
}

}  // namespace

KILN_COMMAND(50, "generate", "Continue a prompt (greedy or sampled), streaming the text", setup);

}  // namespace kiln::tools
