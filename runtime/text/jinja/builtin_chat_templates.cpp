#include "runtime/text/jinja/builtin_chat_templates.h"

#include <algorithm>
#include <cctype>

#include "runtime/core/error.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln {

namespace {

// Each template is written on one line (no literal newlines between tags), so trim_blocks / lstrip_blocks change
// nothing; "\\n" is a newline inside a Jinja string.

// ChatGLM2's build_prompt: "[Round N]\n\n问：{query}\n\n答：{response}\n\n" per turn, numbered from 1, after the
// [gMASK] sop prefix its tokenizer adds. ChatGLM2 has no system role: a system message goes first, followed by a blank
// line (FastChat's chatglm2 format).
const char* const kChatGlm2 =
    "{% set ns = namespace(round=0) %}[gMASK]sop"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('ChatGLM2: the system message must come first') }}{% endif %}"
    "{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{% set ns.round = ns.round + 1 %}"
    "{{ '[Round ' ~ ns.round ~ ']\\n\\n问：' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\n答：' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ raise_exception('ChatGLM2 has no role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n答：' }}{% endif %}";

// ChatGLM-6B's (v1) chat(): the query alone when there is no history; otherwise "[Round i]\n问：{query}\n答：
// {response}\n" per earlier turn, numbered from 0, and "[Round n]\n问：{query}\n答：". Its tokenizer then closes the
// prompt with [gMASK] <sop>. It has no system role: kiln puts a system message first, followed by a newline.
const char* const kChatGlm =
    "{% set ns = namespace(users=0, round=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('ChatGLM-6B: the system message must come first') }}{% endif %}"
    "{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if ns.users == 1 and loop.last %}{{ message['content'] }}"
    "{% else %}{{ '[Round ' ~ ns.round ~ ']\\n问：' + message['content'] + '\\n答：' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '\\n' }}{% set ns.round = ns.round + 1 %}"
    "{% else %}{{ raise_exception('ChatGLM-6B has no role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}[gMASK]<sop>{% endif %}";

// ChatGLM3's build_chat_input: [gMASK] sop, then per message its role token, encode("\n") and encode(content), then
// <|assistant|>. Each encode() gets SentencePiece's dummy-prefix space, which the space before the content stands for
// (kiln's tokenizer encodes the text between special tokens as one SentencePiece call, and "\n" is byte-fallback, so
// the two calls' pieces are the same).
const char* const kChatGlm3 =
    "[gMASK]sop"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'observation'] %}"
    "{{ raise_exception('ChatGLM3 has no role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] %}{{ ' ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}";

// Qwen-7B-Chat's make_context (chat_format "chatml") with chat()'s default system message.
const char* const kQwen =
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = 'You are a helpful assistant.' %}{% set turns = messages %}{% endif %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>' }}"
    "{% for message in turns %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('Qwen-7B-Chat has no role ' + message['role'] + ' (after a first system message, only "
    "user and assistant)') }}"
    "{% endif %}"
    "{{ '\\n<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}";

// internlm-chat-7b's build_inputs (the "<s>" is part of its prompt string): "<|System|>:{meta_instruction}\n",
// "<|User|>:{query}\n", "<|Bot|>:{response}<eoa>\n", ending with "<|Bot|>:".
const char* const kInternLm =
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|System|>:' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|User|>:' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Bot|>:' + message['content'] + '<eoa>\\n' }}"
    "{% else %}{{ raise_exception('internlm-chat has no role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Bot|>:' }}{% endif %}";

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

std::string string_field(const nlohmann::json& c, const char* key) {
  auto it = c.find(key);
  return it != c.end() && it->is_string() ? it->get<std::string>() : std::string();
}

}  // namespace

const std::vector<BuiltinChatTemplate>& builtin_chat_templates() {
  static const std::vector<BuiltinChatTemplate> all = {
      {"chatglm", "ChatGLM-6B (v1)", kChatGlm, {"<eop>"}},
      {"chatglm2", "ChatGLM2-6B", kChatGlm2, {}},
      {"chatglm3", "ChatGLM3-6B", kChatGlm3, {"<|user|>", "<|observation|>"}},
      {"internlm", "internlm-chat-7b / internlm-chat-20b (v1)", kInternLm, {"<eoa>"}},
      {"qwen", "Qwen-7B-Chat / Qwen-14B-Chat (v1)", kQwen, {"<|im_end|>", "<|im_start|>"}},
  };
  return all;
}

const BuiltinChatTemplate* find_builtin_chat_template(std::string_view name) {
  for (const auto& t : builtin_chat_templates())
    if (name == t.name) return &t;
  return nullptr;
}

std::string builtin_chat_template_names() {
  std::string s;
  for (const auto& t : builtin_chat_templates()) s += (s.empty() ? "" : ", ") + std::string(t.name);
  return s;
}

const BuiltinChatTemplate* builtin_chat_template_for_config(const nlohmann::json& config) {
  if (!config.is_object()) return nullptr;
  std::string arch;
  if (auto it = config.find("architectures");
      it != config.end() && it->is_array() && !it->empty() && (*it)[0].is_string())
    arch = (*it)[0].get<std::string>();
  const std::string type = string_field(config, "model_type");
  if (arch == "QWenLMHeadModel" || type == "qwen") return find_builtin_chat_template("qwen");
  if (arch == "InternLMForCausalLM" || type == "internlm") return find_builtin_chat_template("internlm");
  if (arch.rfind("ChatGLM", 0) == 0 || type == "chatglm") {
    // ChatGLM2 and ChatGLM3 share architectures and model_type; their configs keep the Hub name they were saved as.
    // ChatGLM-6B (v1) is told by its config keys (convert/arch_chatglm6b.cpp).
    if (config.contains("inner_hidden_size")) return find_builtin_chat_template("chatglm");
    const std::string name = lower(string_field(config, "_name_or_path"));
    if (name.find("chatglm3") != std::string::npos) return find_builtin_chat_template("chatglm3");
    if (name.find("chatglm2") != std::string::npos) return find_builtin_chat_template("chatglm2");
  }
  return nullptr;
}

void add_turn_end_tokens(std::vector<int64_t>& eos_token_ids, const std::string& origin, const Tokenizer& tok) {
  const std::string prefix = "builtin:";
  if (origin.rfind(prefix, 0) != 0) return;
  const BuiltinChatTemplate* b = find_builtin_chat_template(std::string_view(origin).substr(prefix.size()));
  if (!b) return;
  for (const char* t : b->turn_end_tokens)
    if (auto id = tok.token_to_id(t);
        id && std::find(eos_token_ids.begin(), eos_token_ids.end(), int64_t(*id)) == eos_token_ids.end())
      eos_token_ids.push_back(*id);
}

ChatTemplateText read_chat_template_flag(const std::string& value) {
  ChatTemplateText out;
  if (const BuiltinChatTemplate* b = find_builtin_chat_template(value)) {
    out = {b->source, std::string("builtin:") + b->name};
  } else {
    std::error_code ec;
    if (!std::filesystem::is_regular_file(value, ec))
      throw Error("--chat-template '" + value +
                  "': no such file, and not a built-in template (built-ins: " + builtin_chat_template_names() + ")");
    out = {read_text_file(value), "file"};
  }
  try {
    ChatTemplate check(out.source, nlohmann::json::object());  // a syntax error fails here, not at the first chat
  } catch (const Error& e) {
    throw Error("--chat-template '" + value + "': " + e.what());
  }
  return out;
}

ChatTemplate load_chat_template(const TokenizerFiles& files, const std::string& chat_template_flag) {
  const nlohmann::json cfg = read_tokenizer_config(files);
  if (!chat_template_flag.empty()) return ChatTemplate(read_chat_template_flag(chat_template_flag).source, cfg);
  if (resolve_chat_template(files)) return ChatTemplate::from_files(files);
  std::error_code ec;
  if (std::filesystem::is_regular_file(files.dir / "config.json", ec)) {
    const auto config = nlohmann::json::parse(read_text_file(files.dir / "config.json"), nullptr, false);
    if (const BuiltinChatTemplate* b = builtin_chat_template_for_config(config)) return ChatTemplate(b->source, cfg);
  }
  try {
    return ChatTemplate::from_files(files);
  } catch (const Error& e) {
    throw Error(std::string(e.what()) + "; pass --chat-template FILE or a built-in (" + builtin_chat_template_names() +
                ")");
  }
}

}  // namespace kiln
