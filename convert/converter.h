#pragma once
// HF checkpoint -> workspace. Streams one tensor at a time from the mmapped source through dtype conversion into the
// output shards, so memory stays at a few buffers however big the model is.
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "convert/arch_table.h"
#include "convert/hf_checkpoint.h"
#include "runtime/io/progress.h"
#include "runtime/io/staging_dir.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

struct ConvertOptions {
  std::filesystem::path source;
  std::filesystem::path output;
  std::string dtype = "auto";  // auto | bf16 | fp16 | fp32
  bool force = false;
  bool progress = true;
  uint64_t max_shard_bytes = 2ull << 30;
  std::string command;          // recorded in provenance; must not contain run-specific paths (determinism)
  std::string chat_template;    // --chat-template: a built-in's name or a Jinja file; empty: the checkpoint's
  bool keep_quantized = false;  // GGUF only: keep Q4_0/Q4_1 linears as int4 (convert/gguf_keep_quantized.h)
};

struct ConvertResult {
  nlohmann::ordered_json kiln_json;
  uint64_t tensor_bytes = 0;
};

ConvertResult convert_checkpoint(const ConvertOptions& options);

// The dtype `auto` resolves to: config's torch_dtype/dtype if it is a float type, else the embedding's dtype.
DType resolve_target_dtype(const std::string& requested, const HfCheckpoint& ckpt);

// Where emit_tensor sends bytes. copy() receives ranges that need no conversion, so a file writer can copy them in
// the kernel; by default they go through write().
class TensorSink {
 public:
  virtual ~TensorSink() = default;
  virtual void write(const void* bytes, size_t n) = 0;
  virtual void copy(const MappedFile& file, uint64_t offset, size_t n) { write(file.data() + offset, n); }
};

// A TensorSink into a WorkspaceWriter that advances a progress bar; copied source ranges are dropped from memory
// once written (they were hashed already), converted ones right after conversion.
class WriterSink : public TensorSink {
 public:
  WriterSink(WorkspaceWriter& writer, Progress& progress) : writer_(writer), progress_(progress) {}
  void write(const void* bytes, size_t n) override {
    writer_.write(bytes, n);
    progress_.advance(n);
  }
  void copy(const MappedFile& f, uint64_t off, size_t n) override {
    writer_.copy_range(f, off, n, [&f, off, n] { f.dont_need(off, n); });
    progress_.advance(n);
  }

 private:
  WorkspaceWriter& writer_;
  Progress& progress_;
};

// Emits the bytes of one canonical tensor in `target` dtype: its sources concatenated, each converted with round to
// nearest even. Checks every source's presence, dtype and shape. Throws naming the HF tensor on overflow to fp16.
void emit_tensor(const HfCheckpoint& ckpt, const TensorMapping& mapping, DType target, TensorSink& sink);

// Throws for a checkpoint tensor that no mapping consumes (a tied lm_head and known weightless buffers excepted):
// converting it would silently drop weights.
void check_unused_tensors(const HfCheckpoint& ckpt, const std::vector<TensorMapping>& mappings, const ArchEntry& arch,
                          const ModelSpec& spec);
// sha256 and size of the source's config, index, shards and tokenizer files, for provenance. Stops early (returning
// what it has) once *cancel is set.
nlohmann::ordered_json hash_sources(const std::filesystem::path& dir, const HfCheckpoint& ckpt,
                                    const std::atomic<bool>* cancel);
// kiln.json of a workspace converted from `opt.source` (before WorkspaceWriter::finish adds the manifest);
// `weights_quantization` is its quantization.weights block.
nlohmann::ordered_json converted_document(const ConvertOptions& opt, const ModelSpec& spec, DType target,
                                          nlohmann::ordered_json weights_quantization, const WorkspaceWriter& writer,
                                          size_t tensor_count, uint64_t tensor_bytes, nlohmann::ordered_json tokenizer,
                                          nlohmann::ordered_json source_files);

// The last step of every import: writes kiln.json (`doc`) and its manifest, then moves the staging directory into
// place unless Ctrl-C arrived meanwhile.
ConvertResult commit_converted(WorkspaceWriter& writer, nlohmann::ordered_json doc, uint64_t tensor_bytes,
                               StagingDir& staging);
// Copies the source's tokenizer files and writes its resolved chat template; returns kiln.json's "tokenizer" block.
// `chat_template_flag`: --chat-template (a built-in's name or a file), which replaces the checkpoint's template.
nlohmann::ordered_json add_tokenizer_files(const std::filesystem::path& source, WorkspaceWriter& writer,
                                           const std::string& chat_template_flag = "");
// For a family with a built-in chat template (by config.json), the ids of its turn-end tokens join
// spec.eos_token_ids: the family's own chat() stops there too (ChatGLM3 at <|user|>, Qwen-7B-Chat at <|im_end|>).
void add_family_turn_end_tokens(ModelSpec& spec, const nlohmann::json& config, const std::filesystem::path& source);

}  // namespace kiln
