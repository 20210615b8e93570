#pragma once
// kiln inspect FILE.gguf: the metadata and tensor types of a GGUF model (one file or a split set).
#include <nlohmann/json.hpp>
#include <string>

namespace kiln::tools {

nlohmann::ordered_json inspect_gguf(const std::string& path);
void print_gguf(const nlohmann::ordered_json& description);

}  // namespace kiln::tools
