#pragma once
// Where the text-side files of a model live, for every kind of PATH the CLI accepts: a workspace, an HF model
// directory, a bare tokenizer directory, or a tokenizer.json file. Tokenizer files are copied verbatim into
// workspaces, so the same lookup works for all of them.
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

struct TokenizerFiles {
  std::filesystem::path dir;                              // directory holding the files
  std::optional<std::filesystem::path> tokenizer_json;    // tokenizer.json
  std::optional<std::filesystem::path> tokenizer_model;   // SentencePiece tokenizer.model
  std::optional<std::filesystem::path> tiktoken;          // Qwen v1's qwen.tiktoken (when neither of the above)
  std::optional<std::filesystem::path> tokenizer_config;  // tokenizer_config.json
  std::optional<std::filesystem::path> generation_config;
};

// Throws kiln::Error when PATH does not exist or holds no tokenizer.
TokenizerFiles locate_tokenizer_files(const std::filesystem::path& path);

// Files copied verbatim from an HF directory into a workspace, in this order, when present.
const std::vector<std::string>& tokenizer_file_names();

// tokenizer_config.json parsed, or an empty object when absent. Throws kiln::Error on malformed JSON.
nlohmann::json read_tokenizer_config(const TokenizerFiles& files);

// The chat template as transformers resolves it: a chat_template.jinja file next to the tokenizer wins, then
// tokenizer_config.json's "chat_template" (a string, or a list of {name, template} where "default" is chosen).
std::optional<std::string> resolve_chat_template(const TokenizerFiles& files);

// A special token from tokenizer_config.json, given either as a string or as an AddedToken object {"content": ...}.
std::optional<std::string> special_token_text(const nlohmann::json& tokenizer_config, const char* key);

}  // namespace kiln
