#include "convert/autoawq_import.h"

#include <cstring>
#include <future>

#include "convert/autoawq.h"
#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/progress.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

namespace {

// The source tensor `name`, checked for presence, dtype and shape.
const SourceTensor& checked_tensor(const HfCheckpoint& ckpt, const std::string& name, DType dtype,
                                   const std::vector<int64_t>& shape) {
  const SourceTensor* t = ckpt.find(name);
  if (!t) throw Error(ckpt.dir().string() + ": tensor '" + name + "' is missing from the AutoAWQ checkpoint");
  if (t->info->dtype != dtype || t->info->shape != shape)
    throw Error(t->file->path() + ": tensor '" + name + "' is " + std::string(dtype_name(t->info->dtype)) + " " +
                shape_string(t->info->shape) + "; the AutoAWQ GEMM layout needs " + std::string(dtype_name(dtype)) +
                " " + shape_string(shape));
  return *t;
}

// The three tensors of one unfused projection `base` with `out` outputs, checked.
struct PackedParts {
  const SourceTensor *qweight, *qzeros, *scales;
};
PackedParts packed_parts(const HfCheckpoint& ckpt, const std::string& base, int64_t out, int64_t in, int64_t gs) {
  return {&checked_tensor(ckpt, base + ".qweight", DType::I32, {in, out / 8}),
          &checked_tensor(ckpt, base + ".qzeros", DType::I32, {in / gs, out / 8}),
          &checked_tensor(ckpt, base + ".scales", DType::F16, {in / gs, out})};
}

// A tensor's bytes copied out (mmapped data need not be aligned for int32 access); its source pages are dropped.
template <typename T>
std::vector<T> read_tensor(const SourceTensor* t) {
  std::vector<T> v(size_t(t->info->numel()));
  std::memcpy(v.data(), t->data(), v.size() * sizeof(T));
  t->file->file().dont_need(t->file->data_start() + t->info->begin, t->info->nbytes());  // bounded memory on big models
  return v;
}

// One quantized linear's HF parts must be packed AutoAWQ tensors; refuses layers left in fp16 and shapes the GEMM
// layout cannot hold.
void check_quantized_linear(const HfCheckpoint& ckpt, const CanonicalTensor& c, const TensorMapping& m,
                            const AutoAwqConfig& cfg, const json& skipped, const std::string& label) {
  const int64_t in = c.shape[1];
  for (size_t p = 0; p < m.sources.size(); ++p) {
    const std::string base = strip_weight(m.sources[p]);
    if (skipped.is_array())
      for (const json& s : skipped)
        if (s.is_string() && base.find(s.get<std::string>()) != std::string::npos)
          throw Error(label + ": quantization_config.modules_to_not_convert lists '" + s.get<std::string>() +
                      "', which leaves '" + base +
                      "' unquantized; kiln workspaces quantize every linear of every layer");
    if (!ckpt.find(base + ".qweight") && ckpt.find(base + ".weight"))
      throw Error(ckpt.dir().string() + ": '" + base + "' is stored unquantized ('" + base +
                  ".weight'); kiln workspaces quantize every linear of every layer");
    if (m.part_rows[p] % 8)
      throw Error(label + ": '" + base + "' has " + std::to_string(m.part_rows[p]) +
                  " outputs, not a multiple of 8 as the AutoAWQ GEMM layout needs");
  }
  if (in % cfg.group_size)
    throw Error(label + ": quantization_config.group_size " + std::to_string(cfg.group_size) + " does not divide the " +
                std::to_string(in) + " inputs of '" + strip_weight(m.sources[0]) + "'");
  for (size_t p = 0; p < m.sources.size(); ++p)
    packed_parts(ckpt, strip_weight(m.sources[p]), m.part_rows[p], in, cfg.group_size);
}

// Unpacks every part of a fused linear into its rows of the canonical tensor and writes qweight, scales, zeros.
void write_quantized_linear(const HfCheckpoint& ckpt, const CanonicalTensor& c, const TensorMapping& m, int64_t gs,
                            WorkspaceWriter& writer, Progress& progress) {
  const int64_t rows = c.shape[0], in = c.shape[1], G = in / gs;
  std::vector<uint8_t> qweight(size_t(rows * in / 2)), zeros(size_t(rows * G));
  std::vector<uint16_t> scales(size_t(rows * G));
  int64_t row = 0;
  for (size_t p = 0; p < m.sources.size(); ++p) {
    check_interrupt();
    const std::string base = strip_weight(m.sources[p]);
    const int64_t out = m.part_rows[p];
    const PackedParts parts = packed_parts(ckpt, base, out, in, gs);
    auto qw = read_tensor<int32_t>(parts.qweight);
    auto qz = read_tensor<int32_t>(parts.qzeros);
    auto sc = read_tensor<uint16_t>(parts.scales);
    unpack_autoawq(qw.data(), qz.data(), sc.data(), out, in, gs, qweight.data() + row * in / 2, scales.data() + row * G,
                   zeros.data() + row * G);
    row += out;
    progress.advance((qw.size() + qz.size()) * 4 + sc.size() * 2);
  }
  writer.begin_tensor();
  writer.write(qweight.data(), qweight.size());
  writer.begin_tensor();
  writer.write(scales.data(), scales.size() * 2);
  writer.begin_tensor();
  writer.write(zeros.data(), zeros.size());
}

}  // namespace

json with_legacy_autoawq_config(const json& config, const fs::path& dir) {
  std::error_code ec;
  if (has_quantization_config(config) || !fs::is_regular_file(dir / kLegacyAutoAwqConfig, ec)) return config;
  const fs::path path = dir / kLegacyAutoAwqConfig;
  const std::string text = read_text_file(path);
  check_json_depth(text, path.string());
  json q = json::parse(text, nullptr, false);
  if (q.is_discarded() || !q.is_object()) throw Error(path.string() + ": not a JSON object");
  if (!q.contains("w_bit") && !q.contains("bits")) return config;
  if (!q.contains("quant_method")) q["quant_method"] = "awq";
  json out = config;
  out["quantization_config"] = q;
  return out;
}

ConvertResult convert_autoawq_checkpoint(const ConvertOptions& opt, StagingDir& staging, const HfCheckpoint& ckpt,
                                         const json& config, const ModelSpec& spec, const ArchEntry& arch,
                                         DType target) {
  const std::string label =
      (opt.source / (has_quantization_config(ckpt.config()) ? "config.json" : kLegacyAutoAwqConfig)).string();
  const AutoAwqConfig cfg = parse_autoawq_config(config, label);
  WeightQuantization q;
  q.method = "awq";
  q.bits = cfg.bits;
  q.group_size = cfg.group_size;
  q.zero_point = true;
  q.modules = default_quantized_modules();
  const json skipped = cfg.source.value("modules_to_not_convert", json(nullptr));

  // Check every linear and collect the names each canonical tensor consumes before writing anything.
  const std::vector<CanonicalTensor> canon = canonical_tensors(spec);
  const std::vector<TensorMapping> mappings = tensor_mappings(spec, arch);
  std::vector<TensorMapping> consumed = mappings;
  for (size_t i = 0; i < canon.size(); ++i) {
    if (!q.covers(canon[i].suffix)) continue;
    if (mappings[i].transpose)
      throw Error(label + ": AutoAWQ checkpoints of " + arch.hf_architecture + " are not supported ('" +
                  strip_weight(mappings[i].sources[0]) + "' is a Conv1D weight stored [in, out])");
    if (!mappings[i].row_blocks.empty())
      throw Error(label + ": AutoAWQ checkpoints of " + arch.hf_architecture + " are not supported ('" +
                  strip_weight(mappings[i].sources[0]) +
                  "' packs q, k and v per KV group); convert the unquantized checkpoint and run 'kiln quantize'");
    check_quantized_linear(ckpt, canon[i], mappings[i], cfg, skipped, label);
    consumed[i].sources.clear();
    for (const std::string& s : mappings[i].sources)
      for (const char* part : {".qweight", ".qzeros", ".scales"}) consumed[i].sources.push_back(strip_weight(s) + part);
  }
  check_unused_tensors(ckpt, consumed, arch, spec);

  std::vector<TensorPlan> plan;
  uint64_t total = 0;
  for (const CanonicalTensor& c : canonical_tensors(spec, q)) {
    plan.push_back({c.name, c.dtype ? *c.dtype : target, c.shape});
    total += plan.back().nbytes();
  }

  std::atomic<bool> cancel_hashing{false};
  auto source_hashes = std::async(std::launch::async, hash_sources, opt.source, std::cref(ckpt), &cancel_hashing);
  try {
    WorkspaceWriter writer(staging.path(), plan, opt.max_shard_bytes);
    {
      Progress progress("converting", ckpt.total_tensor_bytes(),
                        opt.progress ? ProgressStyle::bar : ProgressStyle::none);
      WriterSink sink(writer, progress);
      for (size_t i = 0; i < canon.size(); ++i) {
        if (q.covers(canon[i].suffix)) {
          write_quantized_linear(ckpt, canon[i], mappings[i], q.group_size, writer, progress);
        } else {
          writer.begin_tensor();
          emit_tensor(ckpt, mappings[i], target, sink);
        }
      }
      progress.finish();
    }
    ordered_json tokenizer = add_tokenizer_files(opt.source, writer);
    ordered_json weights = weight_quantization_to_json(q);
    weights["imported_from"] = {{"format", "autoawq-gemm"},
                                {"quantization_config", ordered_json::parse(cfg.source.dump())}};
    ordered_json doc =
        converted_document(opt, spec, target, weights, writer, plan.size(), total, tokenizer, source_hashes.get());
    return commit_converted(writer, std::move(doc), total, staging);
  } catch (...) {
    cancel_hashing = true;
    throw;
  }
}

}  // namespace kiln
