#pragma once
// The workspace: a directory with kiln.json (format, model spec, dtype, quantization, provenance, manifest), weights
// in safetensors shards under canonical tensor names, and the tokenizer files. See docs/workspace.md.
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/io/safetensors.h"
#include "runtime/model/model_spec.h"

namespace kiln {

// The newest format_version this kiln reads (see spec_format_version: 1 and 2 differ only in the model block).
constexpr int kWorkspaceFormatVersion = 2;
constexpr const char* kWorkspaceFormat = "kiln-workspace";
constexpr const char* kWorkspaceFile = "kiln.json";
// kiln.json's last key: the sha256 of the document's canonical JSON without this key (docs/workspace.md). The
// manifest covers every other file, so together they cover every byte of a workspace.
constexpr const char* kDocumentHashKey = "kiln_json_sha256";

// The canonical JSON of kiln.json that kDocumentHashKey hashes: every key but kDocumentHashKey, object keys sorted
// by their UTF-8 bytes, no whitespace, numbers in shortest round-trip form, non-ASCII characters unescaped.
std::string canonical_document(const nlohmann::json& doc);
std::string document_sha256(const nlohmann::json& doc);
enum class DocumentHash { ok, missing, mismatch };
DocumentHash check_document_hash(const nlohmann::json& doc);

struct ManifestEntry {
  std::string sha256;
  uint64_t size = 0;
};

// kiln.json, parsed and validated.
struct WorkspaceInfo {
  std::filesystem::path dir;
  nlohmann::json json;  // the whole document
  ModelSpec spec;
  std::string dtype;                      // "fp32" | "fp16" | "bf16"
  std::vector<std::string> weight_files;  // shard file names, in order
  std::map<std::string, ManifestEntry> manifest;
  // ok, or missing for a workspace written before kiln hashed kiln.json (a mismatch is refused while reading).
  DocumentHash document_hash = DocumentHash::ok;
};

bool is_workspace(const std::filesystem::path& dir);
// Throws kiln::Error naming kiln.json and the field on anything missing or malformed, and when the document does
// not match its kiln_json_sha256 (it was edited after kiln wrote it).
WorkspaceInfo read_workspace_info(const std::filesystem::path& dir);

// Workspace dtype names <-> element types.
std::string workspace_dtype_name(DType t);  // F32 -> "fp32", F16 -> "fp16", BF16 -> "bf16"
DType workspace_dtype(const std::string& name, const std::string& label);

// The shard file name for shard k (0-based) of n.
std::string weight_file_name(size_t k, size_t n);

// Splits tensors (in order) into shards of at most max_bytes each (a tensor bigger than that gets a shard of its own).
std::vector<std::vector<TensorPlan>> split_into_shards(const std::vector<TensorPlan>& plan, uint64_t max_bytes);

// Streams a workspace into a (staging) directory: weight shards in plan order, then extra files, then kiln.json
// with the manifest of everything written.
class WorkspaceWriter {
 public:
  WorkspaceWriter(std::filesystem::path dir, const std::vector<TensorPlan>& plan, uint64_t max_shard_bytes);
  ~WorkspaceWriter();
  // Starts the next tensor of the plan; its bytes follow through write().
  void begin_tensor();
  void write(const void* bytes, size_t n);
  // Appends a byte range of a mapped file, copied in the kernel where possible (see SafetensorsWriter::copy_range).
  void copy_range(const MappedFile& src, uint64_t offset, size_t n, std::function<void()> after = nullptr);
  // Adds a file (verbatim copy or given content) to the workspace and the manifest.
  void copy_file(const std::filesystem::path& source, const std::string& name);
  void add_file(const std::string& name, const std::string& content);
  const std::vector<std::string>& weight_files() const { return weight_files_; }
  // Closes the last shard, adds "manifest" to doc and writes kiln.json. Returns the final document.
  nlohmann::ordered_json finish(nlohmann::ordered_json doc);

 private:
  void open_shard(size_t k);
  std::filesystem::path dir_;
  std::vector<std::vector<TensorPlan>> shards_;
  std::vector<std::string> weight_files_;
  size_t shard_ = 0, tensor_in_shard_ = 0;
  bool started_ = false;
  std::unique_ptr<SafetensorsWriter> writer_;
  std::map<std::string, ManifestEntry> manifest_;
};

// A workspace opened for reading: its info and every weight tensor. Usually the tensors are mmapped from the
// workspace's shards; a workspace converted in memory from an HF directory (see open_workspace) holds tensors that
// point into the checkpoint's own maps or into owned buffers.
class Workspace {
 public:
  // What opening checks beyond kiln.json itself (read_workspace_info): every manifest file is a regular file of the
  // manifest's size, every shard header is valid, and a kiln.json without a hash draws a warning on stderr. These
  // cost a stat per file; the contents are re-hashed only by verify_workspace (kiln verify, or --verify).
  explicit Workspace(const std::filesystem::path& dir);
  struct Tensor {
    const SafetensorsFile* file;  // null for in-memory tensors
    const TensorInfo* info;
    const uint8_t* bytes;
    const uint8_t* data() const { return bytes; }
  };
  // An in-memory tensor: its description and where its bytes are (kept alive by `keepalive`).
  struct MemoryTensor {
    TensorInfo info;
    const uint8_t* bytes;
  };
  Workspace(WorkspaceInfo info, std::vector<MemoryTensor> tensors, std::shared_ptr<const void> keepalive);

  const WorkspaceInfo& info() const { return info_; }
  const ModelSpec& spec() const { return info_.spec; }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  const Tensor* find(const std::string& name) const;
  // Throws naming the tensor when it is absent.
  const Tensor& get(const std::string& name) const;

 private:
  WorkspaceInfo info_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::vector<MemoryTensor> memory_;
  std::shared_ptr<const void> keepalive_;
  std::map<std::string, Tensor> tensors_;
};

// Opens a workspace directory, or an HF checkpoint directory converted in memory when an HF opener is registered
// (the runtime cannot depend on convert/; the CLI registers convert's opener at start-up). Throws naming the path.
using HfWorkspaceOpener = std::unique_ptr<Workspace> (*)(const std::filesystem::path& hf_dir);
void register_hf_workspace_opener(HfWorkspaceOpener opener);
std::unique_ptr<Workspace> open_workspace(const std::filesystem::path& path);

}  // namespace kiln
