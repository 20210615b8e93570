#include "convert/gguf_convert.h"

#include <future>
#include <set>

#include "convert/gguf_arch.h"
#include "convert/gguf_dequant.h"
#include "convert/gguf_keep_quantized.h"
#include "convert/gguf_tokenizer.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"

namespace fs = std::filesystem;
using nlohmann::ordered_json;

namespace kiln {

namespace {

using gguf::Mapping;
using gguf::Model;
using gguf::Part;

DType gguf_target_dtype(const std::string& requested) {
  if (requested == "auto" || requested == "bf16") return DType::BF16;
  if (requested == "fp32") return DType::F32;
  if (requested == "fp16") return DType::F16;
  throw Error("--dtype '" + requested + "' is not one of auto, bf16, fp16, fp32");
}

std::vector<int64_t> without_leading_ones(std::vector<int64_t> shape) {
  while (shape.size() > 1 && shape.front() == 1) shape.erase(shape.begin());
  return shape;
}

// The GGUF tensor behind one part, checked for presence, a type kiln decodes and the shape the spec implies.
const gguf::SourceTensor& checked_part(const Model& model, const Part& part) {
  const gguf::SourceTensor* t = model.tensor(part.name);
  if (!t) throw Error(model.label() + ": tensor '" + part.name + "' is missing");
  gguf::check_dequantizable(*t->info->type, part.name, t->file->path());
  if (without_leading_ones(t->info->shape()) != without_leading_ones(part.source_shape))
    throw Error(t->file->path() + ": tensor '" + part.name + "' has shape " + shape_string(t->info->shape()) +
                "; the metadata implies " + shape_string(part.source_shape));
  if (part.unpermute_heads && part.rows % (2 * part.unpermute_heads))
    throw Error(t->file->path() + ": tensor '" + part.name + "' has " + std::to_string(part.rows) +
                " rows, not whole heads of even size");
  return *t;
}

// Rounds fp32 values once to the workspace dtype and hands them to the sink.
void emit_rounded(const std::vector<float>& v, DType target, const std::string& name, std::vector<uint8_t>& buf,
                  TensorSink& sink) {
  buf.resize(v.size() * dtype_size(target));
  if (target == DType::F32) {
    std::memcpy(buf.data(), v.data(), buf.size());
  } else if (target == DType::BF16) {
    convert_f32_to_bf16(v.data(), reinterpret_cast<uint16_t*>(buf.data()), v.size());
  } else if (size_t bad = convert_f32_to_f16(v.data(), reinterpret_cast<uint16_t*>(buf.data()), v.size());
             bad != v.size()) {
    throw Error("tensor '" + name + "' holds " + std::to_string(v[bad]) +
                ", beyond the fp16 range (+-65504); convert with --dtype bf16 or fp32");
  }
  sink.write(buf.data(), buf.size());
}

// Streams one canonical tensor: each part dequantized a chunk of rows at a time (whole heads where rows are
// un-permuted), rounded to `target`.
void emit_gguf_tensor(const Model& model, const Mapping& m, DType target, TensorSink& sink) {
  std::vector<float> wide, reordered;
  std::vector<uint8_t> buf;
  for (const Part& part : m.parts) {
    const gguf::SourceTensor& t = checked_part(model, part);
    const int64_t row_len = m.shape.size() > 1 ? m.shape[1] : 1;
    const gguf::TensorType& type = *t.info->type;
    // A 1-D tensor is decoded whole (its blocks run along it); a matrix in chunks of whole rows.
    const int64_t unit = part.unpermute_heads ? part.rows / part.unpermute_heads : 1;
    int64_t chunk_rows = row_len == 1 ? part.rows : std::max<int64_t>(1, (int64_t(1) << 20) / row_len);
    chunk_rows = std::max(unit, chunk_rows / unit * unit);
    const uint64_t row_bytes = uint64_t(row_len) / type.block_size * type.type_size;
    for (int64_t r = 0; r < part.rows; r += chunk_rows) {
      check_interrupt();
      const int64_t n = std::min(chunk_rows, part.rows - r);
      wide.resize(size_t(n * row_len));
      const uint8_t* src = row_len == 1 ? t.data() : t.data() + uint64_t(part.first_row + r) * row_bytes;
      gguf::dequantize(type, src, wide.data(), uint64_t(n * row_len));
      if (part.shift != 0)
        for (float& x : wide) x -= part.shift;
      if (part.unpermute_heads) {
        reordered.resize(wide.size());
        for (int64_t h = 0; h < n / unit; ++h)
          gguf::unpermute_rows(wide.data() + h * unit * row_len, reordered.data() + h * unit * row_len, unit, row_len,
                               unit);
        wide.swap(reordered);
      }
      emit_rounded(wide, target, part.name, buf, sink);
    }
    t.file->mapped().dont_need(t.file->header().data_start + t.info->offset, t.info->nbytes);
  }
}

void check_all_consumed(const Model& model, const std::vector<Mapping>& mappings,
                        const std::string& copy_of_embedding) {
  std::set<std::string> used = {copy_of_embedding};
  for (const auto& m : mappings)
    for (const auto& p : m.parts) used.insert(p.name);
  for (const auto& [name, t] : model.tensors())
    if (!used.count(name))
      throw Error(t.file->path() + ": tensor '" + name +
                  "' is not part of the model its metadata describes; "
                  "refusing to drop it");
}

ordered_json hash_files(const Model& model, const std::atomic<bool>* cancel) {
  ordered_json out = ordered_json::object();
  for (const auto& f : model.files()) {
    size_t size = 0;
    std::string h = sha256_file(f->path(), &size, cancel);
    out[fs::path(f->path()).filename().string()] = {{"sha256", h}, {"size", size}};
  }
  return out;
}

ordered_json import_record(const Model& model) {
  std::map<std::string, size_t> types;
  for (const auto& [name, t] : model.tensors()) types[t.info->type->name]++;
  ordered_json r = {{"format", "gguf"},
                    {"version", model.header().version},
                    {"files", model.files().size()},
                    {"tensor_types", types}};
  if (const gguf::Value* n = model.find("general.name"); n && n->type == gguf::ValueType::STRING) r["name"] = n->s;
  return r;
}

}  // namespace

ConvertResult convert_gguf(const ConvertOptions& opt) {
  StagingDir staging(opt.output, opt.force);
  const DType target = gguf_target_dtype(opt.dtype);
  Model model(opt.source.string());
  const gguf::Architecture& arch = gguf::find_architecture(model);
  const ModelSpec spec = gguf::spec_from_gguf(model, arch);
  const std::vector<Mapping> mappings = gguf::tensor_mappings(spec, arch);
  for (const Mapping& m : mappings)
    for (const Part& p : m.parts) checked_part(model, p);
  // A tied head may still be in the file as a byte copy of the embedding (spec_from_gguf checked that).
  check_all_consumed(model, mappings, spec.tie_word_embeddings ? arch.names.lm_head : "");
  const gguf::RebuiltTokenizer tokenizer = gguf::rebuild_tokenizer(model);

  const std::vector<CanonicalTensor> canonical = canonical_tensors(spec);  // in the order of `mappings`
  WeightQuantization q;
  const gguf::SourceTensor* head8 = nullptr;  // a Q8_0 head kept as kiln's int8 head
  if (opt.keep_quantized) {
    q = gguf::kept_int4_quantization(model, spec, canonical, mappings);
    head8 = gguf::kept_int8_head(model, spec, arch);
    if (head8) q.head = {"int8", kInt8HeadGroup};
  }

  std::atomic<bool> cancel_hashing{false};
  auto source_hashes = std::async(std::launch::async, hash_files, std::cref(model), &cancel_hashing);
  try {
    std::vector<TensorPlan> plan;
    uint64_t total = 0;
    for (const CanonicalTensor& c : canonical_tensors(spec, q)) {
      plan.push_back({c.name, c.dtype ? *c.dtype : target, c.shape});
      total += plan.back().nbytes();
    }
    WorkspaceWriter writer(staging.path(), plan, opt.max_shard_bytes);
    {
      Progress progress("converting", total, opt.progress ? ProgressStyle::bar : ProgressStyle::none);
      WriterSink sink(writer, progress);
      for (size_t i = 0; i < mappings.size(); ++i) {
        if (q.covers(canonical[i].suffix)) {
          gguf::emit_kept_int4(model, mappings[i], writer, sink);
        } else if (head8 && canonical[i].name == names::kLmHead) {
          gguf::emit_kept_int8_head(*head8, writer, sink);
        } else {
          writer.begin_tensor();
          emit_gguf_tensor(model, mappings[i], target, sink);
        }
      }
      // A tied model's int8 head comes after every other tensor (canonical_tensors).
      if (head8 && spec.tie_word_embeddings) gguf::emit_kept_int8_head(*head8, writer, sink);
      progress.finish();
    }
    writer.add_file("tokenizer.json", tokenizer.tokenizer_json);
    writer.add_file("tokenizer_config.json", tokenizer.tokenizer_config_json);
    if (tokenizer.chat_template) writer.add_file("chat_template.jinja", *tokenizer.chat_template);
    ordered_json tok = {{"files", {"tokenizer.json", "tokenizer_config.json"}},
                        {"chat_template", tokenizer.chat_template ? ordered_json("chat_template.jinja") : nullptr}};
    ordered_json weights = weight_quantization_to_json(q);
    if (q.quantized()) weights["imported_from"] = {{"format", "gguf"}};  // blocks repacked, not requantized
    ordered_json doc =
        converted_document(opt, spec, target, weights, writer, plan.size(), total, tok, source_hashes.get());
    if (q.head.int8()) doc["quantization"]["head"] = head_quantization_to_json(q.head);
    doc["provenance"]["imported_from"] = import_record(model);  // what the dequantized weights were stored as
    return commit_converted(writer, std::move(doc), total, staging);
  } catch (...) {
    cancel_hashing = true;
    throw;
  }
}

}  // namespace kiln
