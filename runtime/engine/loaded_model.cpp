#include "runtime/engine/loaded_model.h"

#include "runtime/core/error.h"
#include "runtime/workspace/verify.h"

namespace kiln {

LoadedModel load_model(const std::filesystem::path& path, unsigned threads, bool full_verify) {
  if (full_verify && is_workspace(path)) {
    VerifyReport r = verify_workspace(path, /*progress=*/false);
    if (!r.ok())
      throw Error(path.string() + ": --verify: " + r.problems[0] +
                  (r.problems.size() > 1 ? " (and " + std::to_string(r.problems.size() - 1) + " more problems)" : ""));
  }
  LoadedModel m;
  m.workspace = open_workspace(path);
  m.backend = make_backend("", threads);  // KILN_DEVICE picks cpu (default) or cuda
  m.model = std::make_unique<Model>(*m.workspace, *m.backend);
  return m;
}

KvDType resolve_kv_dtype(const Workspace& ws, const std::string& flag) {
  if (flag != "auto") return kv_dtype_from_name(flag, "--kv-cache");
  std::string name = "auto";
  const auto& j = ws.info().json;
  if (j.contains("quantization") && j["quantization"].contains("kv_cache") &&
      j["quantization"]["kv_cache"].contains("dtype") && j["quantization"]["kv_cache"]["dtype"].is_string())
    name = j["quantization"]["kv_cache"]["dtype"].get<std::string>();
  if (name == "auto") name = ws.info().dtype;
  // INT8: quantization.kv_cache.mode picks the scales; "static" needs the workspace's kv_cache_scales.safetensors.
  if (name == "int8") {
    const auto& kv = j["quantization"]["kv_cache"];
    name = kv.contains("mode") && kv["mode"] == "static" ? "int8-static" : "int8-online";
  }
  return kv_dtype_from_name(name, ws.info().dir.string() + "/kiln.json quantization.kv_cache.dtype");
}

}  // namespace kiln
