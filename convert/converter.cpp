#include "convert/converter.h"

#include <algorithm>
#include <cstring>
#include <future>
#include <set>
#include <vector>

#include "convert/autoawq.h"
#include "convert/autoawq_import.h"
#include "convert/config_check.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/progress.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/jinja/builtin_chat_templates.h"
#include "runtime/text/tokenizer/files.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

DType resolve_target_dtype(const std::string& requested, const HfCheckpoint& ckpt) {
  if (requested == "fp32") return DType::F32;
  if (requested == "fp16") return DType::F16;
  if (requested == "bf16") return DType::BF16;
  if (requested != "auto") throw Error("--dtype '" + requested + "' is not one of auto, bf16, fp16, fp32");
  for (const char* key : {"torch_dtype", "dtype"}) {
    auto it = ckpt.config().find(key);
    if (it != ckpt.config().end() && it->is_string()) {
      std::string d = it->get<std::string>();
      if (d == "float32") return DType::F32;
      if (d == "float16") return DType::F16;
      if (d == "bfloat16") return DType::BF16;
    }
  }
  for (const auto& [name, t] : ckpt.tensors())
    if (dtype_is_float(t.info->dtype) && t.info->dtype != DType::F64) return t.info->dtype;
  return DType::F32;
}

namespace {

// Converts a chunk; every source value passes through fp32 exactly, then rounds once to the target.
void convert_chunk(DType from, const uint8_t* src, size_t count, DType to, std::vector<float>& wide,
                   std::vector<uint8_t>& out, const std::string& name) {
  wide.resize(count);
  convert_to_f32(from, src, wide.data(), count);
  out.resize(count * dtype_size(to));
  if (to == DType::F32) {
    std::memcpy(out.data(), wide.data(), count * 4);
  } else if (to == DType::BF16) {
    convert_f32_to_bf16(wide.data(), reinterpret_cast<uint16_t*>(out.data()), count);
  } else {
    size_t bad = convert_f32_to_f16(wide.data(), reinterpret_cast<uint16_t*>(out.data()), count);
    if (bad != count)
      throw Error("tensor '" + name + "' holds " + std::to_string(wide[bad]) +
                  ", beyond the fp16 range (+-65504); convert with --dtype bf16 or fp32");
  }
}

// A [rows, cols] source (GPT-2's Conv1D [in, out]) emitted as its [cols, rows] transpose, via fp32 (one tensor's worth
// of memory).
void emit_transposed(const SourceTensor& t, DType target, TensorSink& sink) {
  const TensorInfo& info = *t.info;
  const int64_t rows = info.shape[0], cols = info.shape[1];
  std::vector<float> wide(size_t(rows * cols)), flipped(size_t(rows * cols));
  check_interrupt();
  convert_to_f32(info.dtype, t.data(), wide.data(), wide.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) flipped[size_t(c * rows + r)] = wide[size_t(r * cols + c)];
  std::vector<float> scratch;
  std::vector<uint8_t> out;
  convert_chunk(DType::F32, reinterpret_cast<const uint8_t*>(flipped.data()), flipped.size(), target, scratch, out,
                info.name);
  sink.write(out.data(), out.size());
}

// A single source whose blocks of m.block_rows rows are emitted in the order m.row_blocks gives (InternLM2's wqkv
// regrouped into q, k, v); a block at a time, so memory stays that of one block.
void emit_row_blocks(const SourceTensor& t, const TensorMapping& m, DType target, TensorSink& sink) {
  const TensorInfo& info = *t.info;
  const uint64_t row_elements = info.shape[0] > 0 ? info.numel() / uint64_t(info.shape[0]) : 0;
  const uint64_t block = uint64_t(m.block_rows) * row_elements, esz = dtype_size(info.dtype);
  if (int64_t(m.row_blocks.size()) * m.block_rows != info.shape[0])
    throw Error("internal error: the row blocks of '" + m.canonical + "' do not cover '" + info.name + "'");
  const MappedFile& file = t.file->file();
  const uint64_t file_off = t.file->data_start() + info.begin;
  std::vector<uint8_t> buf;
  std::vector<float> wide;
  for (int64_t b : m.row_blocks) {
    check_interrupt();
    const uint64_t begin = uint64_t(b) * block * esz;
    if (info.dtype == target)
      sink.copy(file, file_off + begin, block * esz);  // bit-exact
    else {
      convert_chunk(info.dtype, t.data() + begin, block, target, wide, buf, info.name);
      sink.write(buf.data(), buf.size());
    }
  }
  file.dont_need(file_off, info.nbytes());
}

}  // namespace

void emit_tensor(const HfCheckpoint& ckpt, const TensorMapping& m, DType target, TensorSink& sink) {
  std::vector<const SourceTensor*> parts;
  for (size_t p = 0; p < m.sources.size(); ++p) {
    const std::string& name = m.sources[p];
    const SourceTensor* t = ckpt.find(name);
    if (!t) throw Error(ckpt.dir().string() + ": tensor '" + name + "' is missing from the checkpoint");
    const TensorInfo& info = *t->info;
    if (info.dtype != DType::F32 && info.dtype != DType::F16 && info.dtype != DType::BF16)
      throw Error(t->file->path() + ": tensor '" + name + "' has dtype " + std::string(dtype_name(info.dtype)) +
                  "; expected F32, F16 or BF16");
    // Each part has the canonical trailing dims and its own row count; parts stack along dim 0.
    const std::vector<int64_t> want = m.source_shape(p);
    if (info.shape != want)
      throw Error(t->file->path() + ": tensor '" + name + "' has shape " + shape_string(info.shape) +
                  "; config.json implies " + shape_string(want));
    parts.push_back(t);
  }

  constexpr size_t kChunkElements = 1 << 20;
  std::vector<uint8_t> buf;
  std::vector<float> wide;
  if (!m.row_blocks.empty()) {
    emit_row_blocks(*parts.at(0), m, target, sink);
    return;
  }
  for (const SourceTensor* t : parts) {
    const TensorInfo& info = *t->info;
    const uint8_t* src = t->data();
    const MappedFile& file = t->file->file();
    const uint64_t file_off = t->file->data_start() + info.begin;
    if (m.transpose) {
      emit_transposed(*t, target, sink);
      file.dont_need(file_off, info.nbytes());
      continue;
    }
    if (info.dtype == target) {
      check_interrupt();
      sink.copy(file, file_off, info.nbytes());  // bit-exact
      continue;
    }
    const size_t esz = dtype_size(info.dtype);
    for (uint64_t i = 0; i < info.numel(); i += kChunkElements) {
      check_interrupt();
      size_t n = size_t(std::min<uint64_t>(kChunkElements, info.numel() - i));
      convert_chunk(info.dtype, src + i * esz, n, target, wide, buf, info.name);
      sink.write(buf.data(), buf.size());
    }
    // Drop the source pages we are done with so resident memory stays bounded on models bigger than RAM.
    file.dont_need(file_off, info.nbytes());
  }
}

// Tensors present in the checkpoint that no mapping consumes. A tied lm_head and known weightless buffers are fine;
// anything else means the checkpoint is not what its config says, and converting it would silently drop weights.
void check_unused_tensors(const HfCheckpoint& ckpt, const std::vector<TensorMapping>& mappings, const ArchEntry& arch,
                          const ModelSpec& spec) {
  std::set<std::string> used;
  for (const auto& m : mappings) used.insert(m.sources.begin(), m.sources.end());
  for (const auto& [name, t] : ckpt.tensors()) {
    if (used.count(name)) continue;
    if (spec.tie_word_embeddings && name == arch.lm_head) continue;
    bool ignored = false;
    for (const char* suffix : arch.ignored)
      ignored |= name.size() >= std::strlen(suffix) &&
                 name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0;
    if (!ignored)
      throw Error(t.file->path() + ": tensor '" + name + "' is not part of a " + arch.hf_architecture +
                  " with this config.json; refusing to drop it");
  }
}

ordered_json hash_sources(const fs::path& dir, const HfCheckpoint& ckpt, const std::atomic<bool>* cancel) {
  std::vector<std::string> files = {"config.json"};
  std::error_code ec;
  if (!ckpt.index_file().empty()) files.push_back(ckpt.index_file());
  for (const auto& s : ckpt.shards()) files.push_back(fs::path(s->path()).filename().string());
  for (const auto& f : tokenizer_file_names())
    if (fs::is_regular_file(dir / f, ec)) files.push_back(f);
  if (fs::is_regular_file(dir / "chat_template.jinja", ec)) files.push_back("chat_template.jinja");
  if (fs::is_regular_file(dir / kLegacyAutoAwqConfig, ec)) files.push_back(kLegacyAutoAwqConfig);
  std::sort(files.begin(), files.end());
  ordered_json out = ordered_json::object();
  for (const auto& f : files) {
    size_t size = 0;
    std::string h = sha256_file((dir / f).string(), &size, cancel);
    out[f] = {{"sha256", h}, {"size", size}};
  }
  return out;
}

namespace {

// Whether the source has file `name` that may be copied into a workspace: a regular file, or a symlink resolving to
// one inside the checkpoint directory. A Hugging Face cache snapshot (REPO/snapshots/REV/) links its files to
// REPO/blobs/, which is allowed too. Anything else (a link out of the checkpoint, a FIFO, a directory) is refused:
// copying it would put a file from elsewhere on the machine into the workspace under the manifest's cover.
bool copyable_source_file(const fs::path& source, const std::string& name) {
  const fs::path p = source / name;
  std::error_code ec;
  const fs::file_status link = fs::symlink_status(p, ec);
  if (!fs::exists(link)) return false;
  if (fs::is_symlink(link)) {
    const fs::path root = resolved_path(source);
    const bool hf_cache = root.parent_path().filename() == "snapshots";
    if (!resolves_inside(p, root) && !(hf_cache && resolves_inside(p, root.parent_path().parent_path() / "blobs")))
      throw Error(p.string() + ": a symlink to " + resolved_path(p).string() +
                  ", outside the checkpoint directory; refusing to copy it into the workspace");
  }
  require_regular_file(p);
  return true;
}

}  // namespace

ordered_json add_tokenizer_files(const fs::path& source, WorkspaceWriter& writer,
                                 const std::string& chat_template_flag) {
  std::vector<std::string> tokenizer_files;
  bool loadable = false;
  for (const auto& f : tokenizer_file_names()) {
    if (!copyable_source_file(source, f)) continue;
    std::string content = read_text_file(source / f);
    if (f.size() > 5 && f.compare(f.size() - 5, 5, ".json") == 0 && !json::accept(content))
      throw Error((source / f).string() + ": not valid JSON; refusing to copy it into the workspace");
    loadable |= f == "tokenizer.json" || f == "tokenizer.model" || f == "qwen.tiktoken";
    writer.add_file(f, content);
    tokenizer_files.push_back(f);
  }
  // The workspace's tokenizer must load, or every runtime command would fail on it later.
  if (loadable) {
    try {
      Tokenizer::load(locate_tokenizer_files(source));
    } catch (const Error& e) {
      throw Error(std::string("the checkpoint's tokenizer does not load: ") + e.what());
    }
  }
  std::error_code ec;
  copyable_source_file(source, "chat_template.jinja");  // read by resolve_chat_template: the same rule applies
  TokenizerFiles text_files;
  text_files.dir = source;
  if (fs::is_regular_file(source / "tokenizer_config.json", ec))
    text_files.tokenizer_config = source / "tokenizer_config.json";
  // --chat-template wins; then the checkpoint's own; then the built-in of a family that builds its prompt in Python.
  std::optional<std::string> chat_template;
  std::string origin;
  if (!chat_template_flag.empty()) {
    ChatTemplateText t = read_chat_template_flag(chat_template_flag);
    chat_template = std::move(t.source);
    origin = t.origin;
  } else if ((chat_template = resolve_chat_template(text_files))) {
    origin = "checkpoint";
  } else if (fs::is_regular_file(source / "config.json", ec)) {
    const json config = json::parse(read_text_file(source / "config.json"), nullptr, false);
    if (const BuiltinChatTemplate* b = builtin_chat_template_for_config(config)) {
      chat_template = b->source;
      origin = std::string("builtin:") + b->name;
    }
  }
  if (chat_template) writer.add_file("chat_template.jinja", *chat_template);
  return {{"files", tokenizer_files},
          {"chat_template", chat_template ? json("chat_template.jinja") : json(nullptr)},
          {"chat_template_source", chat_template ? json(origin) : json(nullptr)}};
}

void add_family_turn_end_tokens(ModelSpec& spec, const json& config, const fs::path& source) {
  const BuiltinChatTemplate* b = builtin_chat_template_for_config(config);
  std::error_code ec;
  if (!b || b->turn_end_tokens.empty() ||
      !(fs::is_regular_file(source / "tokenizer.json", ec) || fs::is_regular_file(source / "tokenizer.model", ec)))
    return;
  add_turn_end_tokens(spec.eos_token_ids, std::string("builtin:") + b->name,
                      Tokenizer::load(locate_tokenizer_files(source)));
}

ConvertResult commit_converted(WorkspaceWriter& writer, ordered_json doc, uint64_t tensor_bytes, StagingDir& staging) {
  ConvertResult result;
  result.kiln_json = writer.finish(std::move(doc));
  result.tensor_bytes = tensor_bytes;
  check_interrupt();
  staging.commit();
  return result;
}

ordered_json converted_document(const ConvertOptions& opt, const ModelSpec& spec, DType target,
                                ordered_json weights_quantization, const WorkspaceWriter& writer, size_t tensor_count,
                                uint64_t tensor_bytes, ordered_json tokenizer, ordered_json source_files) {
  ordered_json doc;
  doc["format"] = kWorkspaceFormat;
  doc["format_version"] = spec_format_version(spec);
  doc["model"] = spec_to_json(spec);
  doc["dtype"] = workspace_dtype_name(target);
  doc["quantization"] = {{"weights", std::move(weights_quantization)}, {"kv_cache", {{"dtype", "auto"}}}};
  doc["weights"] = {{"files", writer.weight_files()}, {"tensor_count", tensor_count}, {"tensor_bytes", tensor_bytes}};
  doc["tokenizer"] = std::move(tokenizer);
  doc["provenance"] = {{"source", fs::absolute(opt.source).lexically_normal().string()},
                       {"source_files", std::move(source_files)},
                       {"kiln_version", KILN_VERSION},
                       {"command", opt.command}};
  return doc;
}

namespace {

ConvertResult finish_conversion(const ConvertOptions& opt, StagingDir& staging, const HfCheckpoint& ckpt,
                                const ModelSpec& spec, DType target, const std::vector<TensorMapping>& mappings,
                                std::future<ordered_json>& source_hashes);

}  // namespace

ConvertResult convert_checkpoint(const ConvertOptions& opt) {
  // Refuse an output over the input, or an existing one, before doing any work.
  refuse_output_overlap(opt.output, opt.source, "the checkpoint");
  StagingDir staging(opt.output, opt.force);
  HfCheckpoint ckpt(opt.source);
  const std::string config_label = (opt.source / "config.json").string();
  ModelSpec spec = spec_from_hf_config(ckpt.config(), ckpt.generation_config(), config_label);
  const ArchEntry& arch = find_architecture(ckpt.config(), config_label);
  check_config_against_tensors(ckpt, spec, arch, config_label);
  const DType target = resolve_target_dtype(opt.dtype, ckpt);
  const json awq_config = with_legacy_autoawq_config(ckpt.config(), opt.source);
  if (is_autoawq_config(awq_config))
    return convert_autoawq_checkpoint(opt, staging, ckpt, awq_config, spec, arch, target);
  if (has_quantization_config(ckpt.config()))
    throw Error(config_label + ": quantization_config " + ckpt.config()["quantization_config"].dump() +
                " is not supported; kiln converts unquantized checkpoints and AutoAWQ ones (quant_method awq)");
  std::vector<TensorMapping> mappings = tensor_mappings(spec, arch);
  check_sources(ckpt, mappings, arch, spec, config_label);
  check_unused_tensors(ckpt, mappings, arch, spec);

  // Source hashes for provenance are computed on the second core while the first converts. If converting fails, the
  // hashing is cancelled so the error (or Ctrl-C) is not held up until every source byte is hashed.
  std::atomic<bool> cancel_hashing{false};
  auto source_hashes = std::async(std::launch::async, hash_sources, opt.source, std::cref(ckpt), &cancel_hashing);
  try {
    return finish_conversion(opt, staging, ckpt, spec, target, mappings, source_hashes);
  } catch (...) {
    cancel_hashing = true;
    throw;
  }
}

namespace {

ConvertResult finish_conversion(const ConvertOptions& opt, StagingDir& staging, const HfCheckpoint& ckpt,
                                const ModelSpec& spec, DType target, const std::vector<TensorMapping>& mappings,
                                std::future<ordered_json>& source_hashes) {
  std::vector<TensorPlan> plan;
  uint64_t total = 0;
  for (const auto& m : mappings) {
    plan.push_back({m.canonical, target, m.shape});
    total += plan.back().nbytes();
  }
  WorkspaceWriter writer(staging.path(), plan, opt.max_shard_bytes);
  {
    Progress progress("converting", total, opt.progress ? ProgressStyle::bar : ProgressStyle::none);
    WriterSink sink(writer, progress);
    for (const auto& m : mappings) {
      writer.begin_tensor();
      emit_tensor(ckpt, m, target, sink);
    }
    progress.finish();
  }

  // Tokenizer files verbatim, then the resolved chat template.
  ordered_json tokenizer = add_tokenizer_files(opt.source, writer, opt.chat_template);
  ModelSpec final_spec = spec;
  add_family_turn_end_tokens(final_spec, ckpt.config(), opt.source);

  ordered_json doc = converted_document(opt, final_spec, target, {{"method", "none"}}, writer, plan.size(), total,
                                        tokenizer, source_hashes.get());
  return commit_converted(writer, std::move(doc), total, staging);
}

}  // namespace

}  // namespace kiln
