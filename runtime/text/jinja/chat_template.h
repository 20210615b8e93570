#pragma once
// A model's chat template, rendered exactly as transformers' apply_chat_template(..., tokenize=False) renders it:
// the same input clean-up (None-valued message keys dropped, reasoning fields aliased), the same special-token
// variables, and kiln's own Jinja interpreter in place of jinja2.
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "runtime/text/tokenizer/files.h"

namespace kiln {

namespace jinja {
class Template;
}

class ChatTemplate {
 public:
  // `tokenizer_config` supplies bos_token, eos_token, unk_token, sep_token, pad_token, cls_token and mask_token
  // (strings or AddedToken objects). Throws kiln::Error on template syntax errors.
  ChatTemplate(std::string source, const nlohmann::json& tokenizer_config);

  // The template found next to a tokenizer (see resolve_chat_template). `for_tools` picks a "tool_use" template
  // from a named list when there is one, as transformers does when tools are passed. Throws kiln::Error naming the
  // path when there is no chat template.
  static ChatTemplate from_files(const TokenizerFiles& files, bool for_tools = false);

  // messages: a list of message objects. tools: null or a list of JSON schemas. extra_kwargs: an object of further
  // template variables (e.g. enable_thinking, documents); they override special tokens of the same name.
  std::string render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                     const nlohmann::ordered_json& tools = nullptr,
                     const nlohmann::ordered_json& extra_kwargs = nlohmann::ordered_json::object()) const;

  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::shared_ptr<const jinja::Template> template_;
  std::vector<std::pair<std::string, std::string>> special_tokens_;
};

}  // namespace kiln
