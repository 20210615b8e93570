#include "convert/autoawq_export.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>

#include "convert/arch_table.h"
#include "convert/autoawq.h"
#include "convert/hf_config.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/progress.h"
#include "runtime/io/staging_dir.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

namespace {

std::string shard_name(size_t k, size_t n) {
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

// Streams tensors in plan order across the shards split_into_shards chose.
class ShardedOutput {
 public:
  ShardedOutput(const fs::path& dir, const std::vector<TensorPlan>& plan, uint64_t max_bytes)
      : dir_(dir), shards_(split_into_shards(plan, max_bytes)) {
    for (size_t k = 0; k < shards_.size(); ++k)
      for (const TensorPlan& t : shards_[k]) weight_map_[t.name] = shard_name(k, shards_.size());
  }
  void write_tensor(const void* bytes, size_t n) {
    check_interrupt();
    if (!writer_ || in_shard_ == shards_[shard_].size()) {
      if (writer_) writer_->finish();
      if (writer_) ++shard_;
      writer_ =
          std::make_unique<SafetensorsWriter>((dir_ / shard_name(shard_, shards_.size())).string(), shards_[shard_],
                                              std::map<std::string, std::string>{{"format", "pt"}});
      in_shard_ = 0;
    }
    writer_->write(bytes, n);
    ++in_shard_;
  }
  // Closes the last shard; writes model.safetensors.index.json when there is more than one. Returns the file names.
  std::vector<std::string> finish(uint64_t total_bytes) {
    if (writer_) writer_->finish();
    std::vector<std::string> files;
    for (size_t k = 0; k < shards_.size(); ++k) files.push_back(shard_name(k, shards_.size()));
    if (shards_.size() > 1) {
      ordered_json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", ordered_json::object()}};
      for (const auto& [name, file] : weight_map_) index["weight_map"][name] = file;  // std::map: sorted keys
      write_text_file(dir_ / "model.safetensors.index.json", index.dump(2) + "\n");
      files.push_back("model.safetensors.index.json");
    }
    return files;
  }

 private:
  fs::path dir_;
  std::vector<std::vector<TensorPlan>> shards_;
  std::map<std::string, std::string> weight_map_;
  size_t shard_ = 0, in_shard_ = 0;
  std::unique_ptr<SafetensorsWriter> writer_;
};

// `count` values of a workspace tensor in fp16; other dtypes round once to nearest even, refusing overflow.
std::vector<uint16_t> to_f16(DType dtype, const uint8_t* src, size_t count, const std::string& name) {
  std::vector<uint16_t> out(count);
  if (dtype == DType::F16) {
    std::memcpy(out.data(), src, count * 2);
    return out;
  }
  std::vector<float> wide(count);
  convert_to_f32(dtype, src, wide.data(), count);
  size_t bad = convert_f32_to_f16(wide.data(), out.data(), count);
  if (bad != count)
    throw Error("tensor '" + name + "' holds " + std::to_string(wide[bad]) +
                ", beyond the fp16 range of AutoAWQ checkpoints (+-65504)");
  return out;
}

}  // namespace

ExportResult export_autoawq(const ExportOptions& opt) {
  refuse_output_overlap(opt.output, opt.workspace, "the workspace");
  StagingDir staging(opt.output, opt.force);  // refuses an existing output before any work
  Workspace ws(opt.workspace);
  const std::string label = (opt.workspace / kWorkspaceFile).string();
  const WeightQuantization q = weight_quantization_from_json(ws.info().json, label);
  if (!q.quantized())
    throw Error(opt.workspace.string() +
                " is not quantized (quantization.weights.method = none); AutoAWQ checkpoints "
                "hold int4 weights: run 'kiln quantize' first");
  if (q.head.int8())
    throw Error(label +
                ": the LM head is int8 (quantization.head), which AutoAWQ checkpoints cannot hold; export "
                "a workspace quantized without --head int8");
  if (ws.spec().num_experts > 0)
    throw Error(label + ": AutoAWQ export of a mixture-of-experts model (" + ws.spec().architecture +
                ") is not supported; kiln runs the workspace itself");
  if (q.modules != default_quantized_modules())
    throw Error(label +
                ": only some linears are quantized; the export needs attn.qkv, attn.o, ffn.gate_up and ffn.down");
  const ModelSpec& spec = ws.spec();
  const DType dtype = workspace_dtype(ws.info().dtype, label);
  const ArchEntry& arch = find_architecture(json{{"architectures", json::array({spec.architecture})}}, label);
  const std::vector<CanonicalTensor> canon = canonical_tensors(spec);
  const std::vector<TensorMapping> mappings = tensor_mappings(spec, arch);

  // Every tensor is read at the size the spec implies, so the workspace must hold exactly those.
  for (const CanonicalTensor& c : canonical_tensors(spec, q)) {
    const Workspace::Tensor& t = ws.get(c.name);
    if (t.info->shape != c.shape || t.info->dtype != (c.dtype ? *c.dtype : dtype))
      throw Error(label + ": tensor '" + c.name + "' does not match the model spec; run 'kiln verify'");
  }

  // The HF tensor list, checked before anything is written.
  std::vector<TensorPlan> plan;
  uint64_t total = 0;
  for (size_t i = 0; i < canon.size(); ++i) {
    const CanonicalTensor& c = canon[i];
    // GPT-2's Conv1D weights are stored [in, out]; AutoAWQ's layout is a Linear's.
    if (mappings[i].transpose)
      throw Error(label + ": " + spec.architecture + " cannot be exported as AutoAWQ ('" +
                  strip_weight(mappings[i].sources[0]) + "' is a Conv1D weight stored [in, out])");
    if (q.covers(c.suffix) && !mappings[i].row_blocks.empty())
      throw Error(label + ": " + spec.architecture + " cannot be exported as AutoAWQ ('" +
                  strip_weight(mappings[i].sources[0]) + "' packs q, k and v per KV group)");
    for (size_t p = 0; p < mappings[i].sources.size(); ++p) {
      const std::string& src = mappings[i].sources[p];
      const int64_t rows = mappings[i].part_rows[p];
      if (q.covers(c.suffix)) {
        const int64_t in = c.shape[1], G = in / q.group_size;
        if (rows % 8)
          throw Error("tensor '" + c.name + "': its part '" + strip_weight(src) + "' has " + std::to_string(rows) +
                      " outputs, not a multiple of 8 as the AutoAWQ GEMM layout needs");
        plan.push_back({strip_weight(src) + ".qweight", DType::I32, {in, rows / 8}});
        plan.push_back({strip_weight(src) + ".qzeros", DType::I32, {G, rows / 8}});
        plan.push_back({strip_weight(src) + ".scales", DType::F16, {G, rows}});
        for (size_t k = plan.size() - 3; k < plan.size(); ++k) total += plan[k].nbytes();
      } else {
        std::vector<int64_t> shape = c.shape;
        shape[0] = rows;
        plan.push_back({src, DType::F16, shape});
        total += plan.back().nbytes();
      }
    }
  }

  ShardedOutput out(staging.path(), plan, opt.max_shard_bytes);
  {
    Progress progress("exporting", total, opt.progress ? ProgressStyle::bar : ProgressStyle::none);
    for (size_t i = 0; i < canon.size(); ++i) {
      const CanonicalTensor& c = canon[i];
      const TensorMapping& m = mappings[i];
      if (q.covers(c.suffix)) {
        const int64_t in = c.shape[1], G = in / q.group_size;
        const uint8_t* qw = ws.get(int4_name(c.name, "qweight")).data();
        const uint8_t* zs = ws.get(int4_name(c.name, "zeros")).data();
        std::vector<uint16_t> sc(size_t(c.shape[0] * G));
        std::memcpy(sc.data(), ws.get(int4_name(c.name, "scales")).data(), sc.size() * 2);
        int64_t row = 0;
        for (size_t p = 0; p < m.sources.size(); ++p) {
          const int64_t rows = m.part_rows[p];
          AutoAwqLinear a = pack_autoawq(qw + row * in / 2, sc.data() + row * G, zs + row * G, rows, in, q.group_size);
          out.write_tensor(a.qweight.data(), a.qweight.size() * 4);
          out.write_tensor(a.qzeros.data(), a.qzeros.size() * 4);
          out.write_tensor(a.scales.data(), a.scales.size() * 2);
          progress.advance((a.qweight.size() + a.qzeros.size()) * 4 + a.scales.size() * 2);
          row += rows;
        }
      } else {
        const Workspace::Tensor& t = ws.get(c.name);
        const size_t cols = size_t(t.info->numel() / uint64_t(c.shape[0]));
        size_t row = 0;
        for (size_t p = 0; p < m.sources.size(); ++p) {
          const size_t n = size_t(m.part_rows[p]) * cols;
          std::vector<uint16_t> h = to_f16(dtype, t.data() + row * cols * dtype_size(dtype), n, m.sources[p]);
          out.write_tensor(h.data(), n * 2);
          progress.advance(n * 2);
          row += size_t(m.part_rows[p]);
        }
      }
    }
    progress.finish();
  }

  ExportResult result;
  result.files = out.finish(total);
  ordered_json config = hf_config_from_spec(spec, "float16");
  config["quantization_config"] = autoawq_quantization_config(q.group_size);
  write_text_file(staging.path() / "config.json", config.dump(2) + "\n");
  result.files.push_back("config.json");
  // generation_config.json, tokenizer files and chat template verbatim from the workspace (which copied them from its
  // source); a generation config made from the spec when the source had none.
  std::vector<std::string> copied;
  const json& tok = ws.info().json.value("tokenizer", json::object());
  if (tok.is_object() && tok.contains("files") && tok["files"].is_array())
    for (const json& f : tok["files"]) copied.push_back(f.get<std::string>());
  if (tok.is_object() && tok.contains("chat_template") && tok["chat_template"].is_string())
    copied.push_back(tok["chat_template"].get<std::string>());
  const bool listed = std::find(copied.begin(), copied.end(), "generation_config.json") != copied.end();
  if (!listed && ws.info().manifest.count("generation_config.json")) {
    copied.push_back("generation_config.json");
  } else if (!listed) {
    write_text_file(staging.path() / "generation_config.json", hf_generation_config_from_spec(spec).dump(2) + "\n");
    result.files.push_back("generation_config.json");
  }
  for (const std::string& f : copied) {
    if (!ws.info().manifest.count(f) || fs::path(f).filename() != fs::path(f))
      throw Error(label + ": tokenizer file '" + f + "' is not in the workspace manifest");
    fs::copy_file(ws.info().dir / f, staging.path() / f);
    result.files.push_back(f);
  }
  std::sort(result.files.begin(), result.files.end());
  result.tensors = int64_t(plan.size());
  result.tensor_bytes = total;
  result.group_size = q.group_size;
  check_interrupt();
  staging.commit();
  return result;
}

}  // namespace kiln
