#pragma once
// Helpers for reading tokenizer.json with error messages that name the file and the field (e.g.
// "tokenizer.json: pre_tokenizer.pretokenizers[1].behavior must be one of ...").
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "runtime/core/error.h"

namespace kiln::text {

using json = nlohmann::json;

struct JsonWhere {
  std::string file;
  std::string path;

  JsonWhere operator/(const std::string& key) const { return {file, path.empty() ? key : path + "." + key}; }
  JsonWhere operator[](size_t i) const { return {file, path + "[" + std::to_string(i) + "]"}; }
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(file + ": " + (path.empty() ? std::string("top level") : path) + " " + what);
  }
};

inline const json& require(const json& j, const char* key, const JsonWhere& w) {
  if (!j.is_object()) w.fail("must be an object");
  auto it = j.find(key);
  if (it == j.end()) (w / key).fail("is missing");
  return *it;
}

inline std::string require_string(const json& j, const char* key, const JsonWhere& w) {
  const json& v = require(j, key, w);
  if (!v.is_string()) (w / key).fail("must be a string");
  return v.get<std::string>();
}

inline std::string opt_string(const json& j, const char* key, const std::string& def, const JsonWhere& w) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_string()) (w / key).fail("must be a string");
  return it->get<std::string>();
}

inline bool opt_bool(const json& j, const char* key, bool def, const JsonWhere& w) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean()) (w / key).fail("must be true or false");
  return it->get<bool>();
}

inline int64_t opt_int(const json& j, const char* key, int64_t def, const JsonWhere& w) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number_integer()) (w / key).fail("must be an integer");
  return it->get<int64_t>();
}

// A single Unicode character given as a JSON string (Metaspace replacement, Strip content).
char32_t require_char(const json& j, const char* key, const JsonWhere& w);

}  // namespace kiln::text
