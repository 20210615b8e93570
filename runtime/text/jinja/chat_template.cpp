#include "runtime/text/jinja/chat_template.h"

#include <ctime>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/jinja/jinja.h"

namespace kiln {
namespace {

using ordered_json = nlohmann::ordered_json;
using jinja::Value;

const char* const kSpecialTokens[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                      "pad_token", "cls_token", "mask_token"};

// transformers' _alias_reasoning_fields: {"thinking": r, **message, "reasoning_content": r}.
ordered_json alias_reasoning(const ordered_json& message) {
  const ordered_json* reasoning = nullptr;
  for (const char* key : {"reasoning_content", "thinking", "reasoning"}) {
    auto it = message.find(key);
    if (it != message.end() && !it->is_null()) {
      reasoning = &*it;
      break;
    }
  }
  if (!reasoning) return message;
  ordered_json out = ordered_json::object();
  out["thinking"] = *reasoning;
  for (const auto& [k, v] : message.items()) out[k] = v;
  out["reasoning_content"] = *reasoning;
  return out;
}

Value strftime_now(jinja::Args& a) {
  a.check("strftime_now", 1, {});
  Value fmt = a.get(0, nullptr);
  if (!fmt.is_string()) throw jinja::Failure("strftime() argument 1 must be str, not " + fmt.type_name());
  std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  char buf[512];
  size_t n = fmt.str().empty() ? 0 : std::strftime(buf, sizeof buf, fmt.str().c_str(), &local);
  if (n == 0 && !fmt.str().empty()) throw jinja::Failure("strftime_now: format too long or invalid");
  return Value::string(std::string(buf, n));
}

}  // namespace

ChatTemplate::ChatTemplate(std::string source, const nlohmann::json& tokenizer_config)
    : source_(std::move(source)), template_(std::make_shared<const jinja::Template>(source_)) {
  for (const char* key : kSpecialTokens)
    if (auto text = special_token_text(tokenizer_config, key)) special_tokens_.emplace_back(key, *text);
}

ChatTemplate ChatTemplate::from_files(const TokenizerFiles& files, bool for_tools) {
  nlohmann::json cfg = read_tokenizer_config(files);
  auto it = cfg.find("chat_template");
  if (for_tools && it != cfg.end() && it->is_array() && !std::filesystem::exists(files.dir / "chat_template.jinja")) {
    for (const auto& t : *it)
      if (t.is_object() && t.value("name", "") == "tool_use" && t.contains("template") && t["template"].is_string())
        return ChatTemplate(t["template"].get<std::string>(), cfg);
  }
  std::optional<std::string> source = resolve_chat_template(files);
  if (!source)
    throw Error(files.dir.string() +
                ": no chat template (tokenizer_config.json has no \"chat_template\" and there is "
                "no chat_template.jinja)");
  return ChatTemplate(std::move(*source), cfg);
}

std::string ChatTemplate::render(const ordered_json& messages, bool add_generation_prompt, const ordered_json& tools,
                                 const ordered_json& extra_kwargs) const {
  if (!messages.is_array()) throw Error("chat messages must be a list of message objects");
  if (messages.empty()) throw Error("cannot apply a chat template to an empty conversation");
  if (!tools.is_null() && !tools.is_array()) throw Error("tools must be a list of JSON schemas");
  if (!extra_kwargs.is_null() && !extra_kwargs.is_object()) throw Error("template keyword arguments must be an object");

  // Copying and converting the documents below recurses once per level: refuse deep ones before either.
  for (const ordered_json* doc : {&messages, &tools, &extra_kwargs})
    if (json_value_depth(*doc) > kMaxJsonDepth)
      throw Error("chat template input nests arrays and objects deeper than " + std::to_string(kMaxJsonDepth) +
                  " levels");
  ordered_json chat = ordered_json::array();
  for (const auto& m : messages) {
    if (!m.is_object()) throw Error("chat messages should be objects, but got " + one_line_excerpt(m.dump()));
    // apply_chat_template drops None-valued keys: templates handle a missing key better than a None.
    ordered_json clean = ordered_json::object();
    for (const auto& [k, v] : m.items())
      if (!v.is_null()) clean[k] = v;
    chat.push_back(alias_reasoning(clean));
  }
  if (tools.is_array())
    for (const auto& t : tools)
      if (!t.is_object()) throw Error("tools should be JSON schemas (objects), but got " + one_line_excerpt(t.dump()));

  std::vector<std::pair<std::string, Value>> vars;
  for (const auto& [k, v] : special_tokens_) vars.emplace_back(k, Value::string(v));
  Value documents = Value::none();
  try {
    if (extra_kwargs.is_object()) {
      for (const auto& [k, v] : extra_kwargs.items()) {
        if (k == "messages" || k == "tools" || k == "add_generation_prompt")
          throw Error("'" + k + "' cannot be passed as an extra template argument");
        if (k == "documents") {
          documents = jinja::from_json(v);
          continue;
        }
        vars.emplace_back(k, jinja::from_json(v));
      }
    }
    vars.emplace_back("messages", jinja::from_json(chat));
    vars.emplace_back("tools", tools.is_null() ? Value::none() : jinja::from_json(tools));
  } catch (const jinja::Failure& f) {
    throw Error(std::string("chat template input: ") + f.what());
  }
  vars.emplace_back("documents", documents);
  vars.emplace_back("add_generation_prompt", Value::boolean(add_generation_prompt));
  vars.emplace_back("raise_exception", Value::function("raise_exception", [](jinja::Args& a) -> Value {
                      throw jinja::Failure(jinja::to_str(a.get(0, "message")));
                    }));
  vars.emplace_back("strftime_now", Value::function("strftime_now", strftime_now));
  return template_->render(vars);
}

}  // namespace kiln
