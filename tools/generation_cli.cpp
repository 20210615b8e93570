#include "tools/generation_cli.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <limits>
#include <sstream>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/path_safety.h"
#include "tools/flag_checks.h"

namespace kiln::tools {

void add_sampling_flags(CLI::App& sub, SamplingFlags& f) {
  sub.add_option("-n,--max-new-tokens", f.max_new_tokens, "Most tokens to generate")
      ->capture_default_str()
      ->check(int_range(1, kMaxTokens));
  sub.add_option("--temperature", f.temperature, "0 = greedy (default unless generation_config.json samples)")
      ->check(finite_range(0, 1e6));
  sub.add_option("--top-p", f.top_p, "Nucleus sampling: keep the smallest set of tokens with this much probability")
      ->check(finite_range(0, 1, /*exclude_lo=*/true));
  sub.add_option("--top-k", f.top_k, "Keep the k most likely tokens (0 = off)")->check(int_range(-1, INT32_MAX));
  sub.add_option("--min-p", f.min_p, "Drop tokens less likely than min_p times the most likely one")
      ->check(finite_range(0, 1));
  sub.add_option("--repetition-penalty", f.repetition_penalty, "HF repetition penalty over prompt and output (1 = off)")
      ->check(finite_range(0, 1e6, /*exclude_lo=*/true));
  sub.add_option("--presence-penalty", f.presence_penalty, "OpenAI presence penalty over the output, in [-2, 2]")
      ->check(finite_range(-2, 2));
  sub.add_option("--frequency-penalty", f.frequency_penalty, "OpenAI frequency penalty over the output, in [-2, 2]")
      ->check(finite_range(-2, 2));
  sub.add_option("--seed", f.seed, "Sampling seed (default: random)");
  sub.add_option("--stop", f.stop, "Stop string, not included in the output (repeatable)")->allow_extra_args(false);
  sub.add_flag("--ignore-eos", f.ignore_eos, "Keep generating past the model's EOS tokens");
}

nlohmann::json read_generation_config(const TokenizerFiles& files) {
  if (!files.generation_config) return nlohmann::json::object();
  require_regular_file(*files.generation_config);
  std::ifstream in(*files.generation_config, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  check_json_depth(text, files.generation_config->string());
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error(files.generation_config->string() + ": not a JSON object");
  return j;
}

namespace {

template <class T>
std::optional<T> number(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return std::nullopt;
  return it->get<T>();
}

}  // namespace

SamplingParams resolve_sampling(const SamplingFlags& f, const nlohmann::json& gc) {
  SamplingParams p;
  const bool do_sample = gc.value("do_sample", false);
  p.temperature = f.temperature.value_or(do_sample ? number<float>(gc, "temperature").value_or(1.0f) : 0.0f);
  p.top_p = f.top_p.value_or(do_sample ? number<float>(gc, "top_p").value_or(1.0f) : 1.0f);
  p.top_k = f.top_k.value_or(do_sample ? number<int32_t>(gc, "top_k").value_or(50) : 0);
  p.min_p = f.min_p.value_or(do_sample ? number<float>(gc, "min_p").value_or(0.0f) : 0.0f);
  p.repetition_penalty = f.repetition_penalty.value_or(number<float>(gc, "repetition_penalty").value_or(1.0f));
  p.presence_penalty = f.presence_penalty.value_or(0.0f);
  p.frequency_penalty = f.frequency_penalty.value_or(0.0f);
  p.seed = f.seed;
  p.stop = f.stop;
  p.ignore_eos = f.ignore_eos;
  if (f.max_new_tokens < 1) throw Error("--max-new-tokens must be >= 1");
  p.max_new_tokens = int32_t(std::min<int64_t>(f.max_new_tokens, std::numeric_limits<int32_t>::max()));
  p.validate();
  return p;
}

std::vector<int32_t> encode_chat(const Tokenizer& tok, const ChatTemplate& tpl,
                                 const nlohmann::ordered_json& messages) {
  return tok.encode(tpl.render(messages, true), false);
}

std::vector<int32_t> eos_ids(const std::vector<int64_t>& spec_eos) {
  return std::vector<int32_t>(spec_eos.begin(), spec_eos.end());
}

}  // namespace kiln::tools
