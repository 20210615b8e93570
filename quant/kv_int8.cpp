#include "quant/kv_int8.h"

#include <algorithm>
#include <vector>

#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"
#include "runtime/kv/kv_int8.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace kiln {

KvStaticScales kv_scales_from_stats(const fs::path& stats, int64_t num_layers, int64_t num_kv_heads) {
  if (!fs::is_regular_file(stats)) throw Error(stats.string() + ": KV statistics file not found");
  SafetensorsFile f(stats.string());
  KvStaticScales s;
  for (int64_t l = 0; l < num_layers; ++l) {
    for (auto [which, dst] : {std::pair{"k", &s.k}, std::pair{"v", &s.v}}) {
      const std::string name = "layers." + std::to_string(l) + ".kv." + which + "_abs_max";
      const TensorInfo* t = f.find(name);
      if (!t)
        throw Error(stats.string() + ": tensor '" + name + "' is missing; is this a kiln calibrate stats file of a " +
                    std::to_string(num_layers) + "-layer model?");
      if (t->dtype != DType::F32 || t->shape != std::vector<int64_t>{num_kv_heads})
        throw Error(stats.string() + ": tensor '" + name + "' is " + shape_string(t->shape) + ", the model has " +
                    std::to_string(num_kv_heads) + " kv heads; these statistics are from another model");
      const auto* p = reinterpret_cast<const float*>(f.data(*t));
      for (int64_t h = 0; h < num_kv_heads; ++h) dst->push_back(kv_static_scale(p[h]));
    }
  }
  // More layers in the stats than in the model also means another model.
  if (f.find("layers." + std::to_string(num_layers) + ".kv.k_abs_max"))
    throw Error(stats.string() + ": statistics have more than the model's " + std::to_string(num_layers) +
                " layers; they are from another model");
  return s;
}

KvQuantizeResult quantize_kv_cache(const KvQuantizeOptions& opt) {
  if (opt.mode != "static" && opt.mode != "online")
    throw Error("--kv-mode '" + opt.mode + "' is not supported; use static or online");
  if (opt.mode == "static" && opt.stats.empty())
    throw Error("--kv-mode static needs calibration statistics: pass --kv-stats STATS (written by kiln calibrate)");
  refuse_output_overlap(opt.output, opt.input, "the input workspace");
  refuse_output_overlap(opt.output, opt.reference, "the reference workspace");
  refuse_output_overlap(opt.output, opt.stats, "--kv-stats");
  refuse_output_overlap(opt.output, opt.eval_text, "--eval-text");
  StagingDir staging(opt.output, opt.force);
  Workspace src(opt.input);
  const WorkspaceInfo& info = src.info();
  const std::string label = (opt.input / kWorkspaceFile).string();
  KvStaticScales scales;
  if (opt.mode == "static") scales = kv_scales_from_stats(opt.stats, info.spec.num_layers, info.spec.num_kv_heads);

  // Every tensor is copied byte for byte in canonical order (so int4 and 16-bit inputs both work).
  const WeightQuantization wq = weight_quantization_from_json(info.json, label);
  std::vector<TensorPlan> plan;
  uint64_t tensor_bytes = 0;
  for (const CanonicalTensor& c : canonical_tensors(info.spec, wq)) {
    const Workspace::Tensor& t = src.get(c.name);
    plan.push_back({c.name, t.info->dtype, t.info->shape});
    tensor_bytes += t.info->nbytes();
  }
  WorkspaceWriter writer(staging.path(), plan, opt.max_shard_bytes);
  for (const TensorPlan& p : plan) {
    check_interrupt();
    const Workspace::Tensor& t = src.get(p.name);
    if (!t.file) throw Error(label + ": tensor '" + p.name + "' is not stored in a workspace file");
    const MappedFile& file = t.file->file();
    const uint64_t off = t.file->data_start() + t.info->begin, n = t.info->nbytes();
    writer.begin_tensor();
    writer.copy_range(file, off, size_t(n), [&file, off, n] { file.dont_need(off, n); });
  }
  for (const auto& [name, entry] : info.manifest) {
    if (std::find(info.weight_files.begin(), info.weight_files.end(), name) != info.weight_files.end()) continue;
    if (name == kKvScalesFile) continue;  // replaced below (or dropped in online mode)
    writer.copy_file(info.dir / name, name);
  }
  if (opt.mode == "static")
    writer.add_file(kKvScalesFile, kv_scales_file_bytes(info.spec.num_layers, info.spec.num_kv_heads, scales));

  ordered_json doc = ordered_json::parse(info.json.dump());
  doc.erase("manifest");
  ordered_json kv = {{"dtype", "int8"}, {"mode", opt.mode}};
  if (opt.mode == "static")
    kv.merge_patch({{"scheme", "symmetric"}, {"scales_file", kKvScalesFile}, {"granularity", "per_layer_per_kv_head"}});
  else
    kv.merge_patch({{"scheme", "asymmetric"}, {"granularity", "per_token_per_kv_head"}});
  doc["quantization"]["kv_cache"] = kv;
  doc["weights"]["files"] = writer.weight_files();
  doc["weights"]["tensor_count"] = plan.size();
  doc["weights"]["tensor_bytes"] = tensor_bytes;
  size_t size = 0;
  const std::string src_hash = sha256_file((info.dir / kWorkspaceFile).string(), &size);
  ordered_json prov = {{"source", fs::absolute(opt.input).lexically_normal().string()},
                       {"source_files", {{kWorkspaceFile, {{"sha256", src_hash}, {"size", size}}}}},
                       {"source_provenance", doc.contains("provenance") ? doc["provenance"] : ordered_json(nullptr)},
                       {"kiln_version", KILN_VERSION},
                       {"command", opt.command}};
  if (opt.mode == "static") {
    size_t ssize = 0;
    prov["kv_stats"] = {{"sha256", sha256_file(opt.stats.string(), &ssize)}, {"size", ssize}};
  }
  doc["provenance"] = prov;
  writer.finish(doc);
  check_interrupt();
  KvQuantizeResult result;
  if (!opt.eval_text.empty()) {
    const KvDType kv = opt.mode == "static" ? KvDType::I8Static : KvDType::I8Online;
    result.quality = compare_workspaces(staging.path(), opt.reference.empty() ? opt.input : opt.reference,
                                        opt.eval_text, opt.eval_ctx, opt.eval_max_tokens, opt.threads, kv);
    if (opt.max_ppl_increase && !(result.quality->ppl_increase <= *opt.max_ppl_increase)) {
      result.gate_failed = true;
      return result;  // not committed: the staging directory is removed
    }
  }
  staging.commit();
  return result;
}

}  // namespace kiln
