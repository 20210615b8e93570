#include "runtime/text/tokenizer/files.h"

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/staging_dir.h"

namespace fs = std::filesystem;

namespace kiln {

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {
      "tokenizer.json", "tokenizer.model", "tokenizer_config.json",  "special_tokens_map.json", "added_tokens.json",
      "vocab.json",     "merges.txt",      "generation_config.json", "qwen.tiktoken",           "ice_text.model"};
  return names;
}

TokenizerFiles locate_tokenizer_files(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path.string() + ": no such file or directory");
  TokenizerFiles f;
  if (fs::is_regular_file(path, ec)) {
    f.dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    if (path.extension() == ".model")
      f.tokenizer_model = path;
    else if (path.extension() == ".tiktoken")
      f.tiktoken = path;
    else
      f.tokenizer_json = path;
  } else {
    f.dir = path;
    if (fs::is_regular_file(path / "tokenizer.json", ec)) f.tokenizer_json = path / "tokenizer.json";
    if (fs::is_regular_file(path / "tokenizer.model", ec)) f.tokenizer_model = path / "tokenizer.model";
    // ChatGLM-6B (v1) names its SentencePiece model ice_text.model.
    if (!f.tokenizer_model && fs::is_regular_file(path / "ice_text.model", ec))
      f.tokenizer_model = path / "ice_text.model";
    if (fs::is_regular_file(path / "qwen.tiktoken", ec)) f.tiktoken = path / "qwen.tiktoken";
  }
  if (fs::is_regular_file(f.dir / "tokenizer_config.json", ec)) f.tokenizer_config = f.dir / "tokenizer_config.json";
  if (fs::is_regular_file(f.dir / "generation_config.json", ec)) f.generation_config = f.dir / "generation_config.json";
  if (!f.tokenizer_json && !f.tokenizer_model && !f.tiktoken)
    throw Error(path.string() + ": no tokenizer found (expected tokenizer.json, tokenizer.model or qwen.tiktoken)");
  return f;
}

nlohmann::json read_tokenizer_config(const TokenizerFiles& files) {
  if (!files.tokenizer_config) return nlohmann::json::object();
  const std::string text = read_text_file(*files.tokenizer_config);
  check_json_depth(text, files.tokenizer_config->string());
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Error(files.tokenizer_config->string() + ": not a valid JSON object");
  return j;
}

std::optional<std::string> resolve_chat_template(const TokenizerFiles& files) {
  std::error_code ec;
  if (fs::is_regular_file(files.dir / "chat_template.jinja", ec))
    return read_text_file(files.dir / "chat_template.jinja");
  nlohmann::json cfg = read_tokenizer_config(files);
  auto it = cfg.find("chat_template");
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_array()) {
    for (const auto& t : *it)
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string())
        return t["template"].get<std::string>();
    throw Error(files.tokenizer_config->string() + ": chat_template list has no template named 'default'");
  }
  throw Error(files.tokenizer_config->string() + ": chat_template is neither a string nor a list");
}

std::optional<std::string> special_token_text(const nlohmann::json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace kiln
