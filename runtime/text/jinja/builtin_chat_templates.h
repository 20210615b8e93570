#pragma once
// Chat templates for checkpoints that ship none because their family builds the prompt in Python (internlm-chat v1,
// Qwen-7B-Chat, ChatGLM2, ChatGLM3), and the --chat-template flag of convert, chat, generate and serve. Each built-in
// renders the string (and, through kiln's tokenizer, the ids) the family's own prompt-building code produces; see
// docs/chat_templates.md.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/text/jinja/chat_template.h"
#include "runtime/text/tokenizer/files.h"

namespace kiln {

struct BuiltinChatTemplate {
  const char* name;    // what --chat-template NAME takes
  const char* family;  // whose prompt-building code it reproduces
  const char* source;  // Jinja
  // Tokens at which the family's own chat() stops besides EOS (the end of an answer, or the start of the next turn).
  std::vector<const char*> turn_end_tokens;
};

const std::vector<BuiltinChatTemplate>& builtin_chat_templates();
const BuiltinChatTemplate* find_builtin_chat_template(std::string_view name);
std::string builtin_chat_template_names();  // "chatglm2, chatglm3, ..." for messages

// The built-in for a checkpoint's config.json (architectures, model_type, and for ChatGLM, whose two generations share
// both, _name_or_path), or null when the family is not one of them.
const BuiltinChatTemplate* builtin_chat_template_for_config(const nlohmann::json& config);

// Adds to `eos_token_ids` the ids (under `tok`) of the turn-end tokens of the built-in named by `origin`
// ("builtin:NAME"; anything else adds nothing), so that generation stops where the family's chat() stops.
class Tokenizer;
void add_turn_end_tokens(std::vector<int64_t>& eos_token_ids, const std::string& origin, const Tokenizer& tok);

// A --chat-template value: a built-in's name, else a Jinja file. Returns the template text and where it came from
// ("builtin:NAME" or "file"). Throws kiln::Error naming the value when it is neither.
struct ChatTemplateText {
  std::string source;
  std::string origin;
};
ChatTemplateText read_chat_template_flag(const std::string& value);

// The template a command uses: --chat-template when given; else the one next to the tokenizer; else, for an HF
// directory whose config.json names a family above, its built-in. Throws kiln::Error (suggesting --chat-template)
// when there is none.
ChatTemplate load_chat_template(const TokenizerFiles& files, const std::string& chat_template_flag);

}  // namespace kiln
