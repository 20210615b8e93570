#pragma once
// What `kiln generate` and `kiln chat` share: the sampling flags, their defaults from generation_config.json, and
// chat-template prompts tokenized as transformers does.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "runtime/sampling/params.h"
#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln::tools {

struct SamplingFlags {
  std::optional<float> temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
  std::optional<int32_t> top_k;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  int64_t max_new_tokens = 256;
  bool ignore_eos = false;
};

void add_sampling_flags(CLI::App& sub, SamplingFlags& flags);

// generation_config.json next to the tokenizer, or an empty object. Throws kiln::Error on malformed JSON.
nlohmann::json read_generation_config(const TokenizerFiles& files);

// Flags win; unset ones come from generation_config.json as transformers applies it: its temperature/top_p/top_k only
// count when it sets do_sample (then unset ones take transformers' defaults 1.0/1.0/50); otherwise greedy.
// repetition_penalty applies either way. max_new_tokens is clamped to what SamplingParams holds.
SamplingParams resolve_sampling(const SamplingFlags& flags, const nlohmann::json& generation_config);

// As transformers' apply_chat_template(messages, add_generation_prompt=True, tokenize=True): the template supplies
// BOS and the other special tokens, so the rendered text is encoded with add_special_tokens=False.
std::vector<int32_t> encode_chat(const Tokenizer& tok, const ChatTemplate& tpl, const nlohmann::ordered_json& messages);

// The model's EOS ids as int32 (spec ids come from generation_config.json/config.json at convert time).
std::vector<int32_t> eos_ids(const std::vector<int64_t>& spec_eos);

}  // namespace kiln::tools
