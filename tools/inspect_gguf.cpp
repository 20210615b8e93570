#include "tools/inspect_gguf.h"

#include <cstdio>
#include <map>

#include "convert/gguf_file.h"

namespace kiln::tools {

using nlohmann::ordered_json;

namespace {

// Arrays longer than this (vocabularies, merges) are described by their type and length only.
constexpr size_t kArrayItemsShown = 16;

ordered_json value_json(const gguf::Value& v) {
  using gguf::ValueType;
  switch (v.type) {
    case ValueType::BOOL:
      return v.u != 0;
    case ValueType::STRING:
      return v.s;
    case ValueType::F32:
    case ValueType::F64:
      return v.f;
    case ValueType::U8:
    case ValueType::U16:
    case ValueType::U32:
    case ValueType::U64:
      return v.u;
    case ValueType::ARRAY: {
      if (v.items.size() > kArrayItemsShown) return v.summary();
      ordered_json a = ordered_json::array();
      for (const auto& item : v.items) a.push_back(value_json(item));
      return a;
    }
    default:
      return v.i;
  }
}

}  // namespace

ordered_json inspect_gguf(const std::string& path) {
  gguf::Model model(path);
  ordered_json out;
  out["kind"] = "gguf";
  out["path"] = path;
  out["version"] = model.header().version;
  out["alignment"] = model.header().alignment;
  ordered_json files = ordered_json::array();
  for (const auto& f : model.files()) files.push_back(f->path());
  out["files"] = files;
  ordered_json meta = ordered_json::object();
  for (const auto& [key, value] : model.header().metadata) meta[key] = value_json(value);
  out["metadata"] = meta;
  std::map<std::string, std::pair<uint64_t, uint64_t>> by_type;  // type -> (tensors, elements)
  uint64_t params = 0, bytes = 0;
  ordered_json tensors = ordered_json::array();
  for (const auto& f : model.files())
    for (const auto& t : f->header().tensors) {
      by_type[t.type->name].first += 1;
      by_type[t.type->name].second += t.numel();
      params += t.numel();
      bytes += t.nbytes;
      tensors.push_back({{"name", t.name}, {"type", t.type->name}, {"shape", t.shape()}});
    }
  ordered_json types = ordered_json::object();
  for (const auto& [name, n] : by_type) types[name] = {{"tensors", n.first}, {"parameters", n.second}};
  out["tensor_types"] = types;
  out["parameters"] = params;
  out["tensor_bytes"] = bytes;
  out["tensors"] = tensors;
  return out;
}

void print_gguf(const ordered_json& j) {
  std::printf("gguf: %s (version %u, %zu file%s, alignment %llu)\n", j["path"].get<std::string>().c_str(),
              j["version"].get<unsigned>(), j["files"].size(), j["files"].size() == 1 ? "" : "s",
              (unsigned long long)j["alignment"].get<uint64_t>());
  std::printf("  metadata (%zu keys)\n", j["metadata"].size());
  for (const auto& [key, value] : j["metadata"].items()) {
    std::string text = value.is_string() ? value.get<std::string>() : value.dump();
    std::string shown;
    for (char c : text.substr(0, 100)) shown += c == '\n' ? std::string("\\n") : std::string(1, c);
    if (text.size() > 100) shown += "... (" + std::to_string(text.size()) + " bytes)";
    std::printf("    %-40s %s\n", key.c_str(), shown.c_str());
  }
  std::printf("  tensor types\n");
  for (const auto& [name, n] : j["tensor_types"].items())
    std::printf("    %-8s %5llu tensors, %.3f M parameters\n", name.c_str(),
                (unsigned long long)n["tensors"].get<uint64_t>(), double(n["parameters"].get<uint64_t>()) / 1e6);
  std::printf("  parameters     %.3f M in %zu tensors, %.1f MB\n", double(j["parameters"].get<uint64_t>()) / 1e6,
              j["tensors"].size(), double(j["tensor_bytes"].get<uint64_t>()) / 1e6);
}

}  // namespace kiln::tools
