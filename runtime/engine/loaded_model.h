#pragma once
// What every runtime command opens first: a workspace, a backend and the model packed into it.
#include <filesystem>
#include <memory>

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
// threads = 0: the backend's default.
LoadedModel load_model(const std::filesystem::path& path, unsigned threads = 0);

// The KV dtype a workspace asks for: quantization.kv_cache.dtype, where "auto" means the weight dtype.
KvDType default_kv_dtype(const Workspace& ws);

}  // namespace kiln
