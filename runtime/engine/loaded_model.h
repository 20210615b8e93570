#pragma once
// What every runtime command opens first: a workspace, a backend and the model packed into it.
#include <filesystem>
#include <memory>
#include <string>

#include "runtime/backend/backend.h"
#include "runtime/model/model.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

struct LoadedModel {
  std::unique_ptr<Workspace> workspace;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

// Throws kiln::Error with one sentence naming the path when it is missing, not a workspace, or damaged.
// threads = 0: the backend's default. The device is $KILN_DEVICE (cpu or cuda; default cpu).
// Opening checks kiln.json's hash, file sizes, shard headers and tensor shapes (see Workspace); full_verify also
// re-hashes every file against the manifest first, as kiln verify does (an HF directory has no manifest to check).
LoadedModel load_model(const std::filesystem::path& path, unsigned threads = 0, bool full_verify = false);

// The help line of every runtime command's --verify flag.
inline constexpr const char* kVerifyFlagHelp =
    "Re-hash every workspace file against the manifest before loading (as kiln verify does; opening always checks "
    "kiln.json's hash and the file sizes)";

// The KV dtype of a --kv-cache flag; "auto" is what the workspace asks for: quantization.kv_cache.dtype (with its
// mode for int8), where "auto" means the weight dtype.
KvDType resolve_kv_dtype(const Workspace& ws, const std::string& flag = "auto");

// The help line of every runtime command's --kv-cache flag.
inline constexpr const char* kKvCacheFlagHelp =
    "KV cache dtype: auto (the workspace's), fp32, fp16, bf16, int8 (online scales) or int8-static";

}  // namespace kiln
