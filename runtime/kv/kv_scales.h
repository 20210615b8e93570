#pragma once
// Static INT8 KV scales in a workspace: kv_cache_scales.safetensors with `kv_cache.k_scale` and `kv_cache.v_scale`,
// fp32 [num_layers, num_kv_heads] each (docs/kv_cache.md). Kept apart from the weight shards so that adding or
// replacing KV scales never rewrites the weights, and so that the same file works next to int4 or 16-bit weights.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "runtime/workspace/workspace.h"

namespace kiln {

constexpr const char* kKvScalesFile = "kv_cache_scales.safetensors";

struct KvStaticScales {
  std::vector<float> k, v;  // [num_layers * num_kv_heads], layer-major
};

// The bytes of a scales file (deterministic: fixed header order, no metadata that varies).
std::string kv_scales_file_bytes(int64_t num_layers, int64_t num_kv_heads, const KvStaticScales& s);

// The workspace's static scales when kiln.json's manifest lists kKvScalesFile, else nullopt. Throws kiln::Error
// naming the file and tensor when a tensor is missing, not f32, the wrong shape, or holds a negative/non-finite scale.
std::optional<KvStaticScales> read_kv_static_scales(const WorkspaceInfo& info);

}  // namespace kiln
