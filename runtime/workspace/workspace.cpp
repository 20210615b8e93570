#include "runtime/workspace/workspace.h"

#include <sys/stat.h>

#include <cstdio>

#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

bool is_workspace(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / kWorkspaceFile, ec);
}

std::string workspace_dtype_name(DType t) {
  switch (t) {
    case DType::F32:
      return "fp32";
    case DType::F16:
      return "fp16";
    case DType::BF16:
      return "bf16";
    default:
      throw Error("internal error: workspace dtype must be fp32, fp16 or bf16");
  }
}

DType workspace_dtype(const std::string& name, const std::string& label) {
  if (name == "fp32") return DType::F32;
  if (name == "fp16") return DType::F16;
  if (name == "bf16") return DType::BF16;
  throw Error(label + ": dtype '" + name + "' is not one of fp32, fp16, bf16");
}

std::string weight_file_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "weights-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

std::vector<std::vector<TensorPlan>> split_into_shards(const std::vector<TensorPlan>& plan, uint64_t max_bytes) {
  std::vector<std::vector<TensorPlan>> shards(1);
  uint64_t used = 0;
  for (const auto& t : plan) {
    uint64_t n = t.nbytes();
    if (!shards.back().empty() && used + n > max_bytes) {
      shards.emplace_back();
      used = 0;
    }
    shards.back().push_back(t);
    used += n;
  }
  return shards;
}

std::string canonical_document(const json& doc) {
  json copy = doc;  // nlohmann::json keeps object keys in a std::map: sorted by bytes
  copy.erase(kDocumentHashKey);
  return copy.dump(-1, ' ', /*ensure_ascii=*/false, json::error_handler_t::strict);
}

std::string document_sha256(const json& doc) {
  const std::string text = canonical_document(doc);
  Sha256 h;
  h.update(text.data(), text.size());
  return h.hex_digest();
}

DocumentHash check_document_hash(const json& doc) {
  auto it = doc.find(kDocumentHashKey);
  if (it == doc.end()) return DocumentHash::missing;
  return it->is_string() && it->get<std::string>() == document_sha256(doc) ? DocumentHash::ok : DocumentHash::mismatch;
}

WorkspaceInfo read_workspace_info(const fs::path& dir) {
  const fs::path path = dir / kWorkspaceFile;
  const std::string label = path.string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(dir.string() + ": no such workspace directory");
  if (!fs::is_regular_file(path, ec)) throw Error(dir.string() + ": not a kiln workspace (no kiln.json)");
  WorkspaceInfo w;
  w.dir = dir;
  const std::string text = read_text_file(path);
  check_json_depth(text, label);
  w.json = json::parse(text, nullptr, false);
  if (w.json.is_discarded() || !w.json.is_object()) throw Error(label + ": not a valid JSON object");
  const json& j = w.json;
  if (j.value("format", "") != kWorkspaceFormat) throw Error(label + ": 'format' is not \"kiln-workspace\"");
  // Before any field is trusted: an edited document is refused as a whole, whatever the edit was.
  w.document_hash = check_document_hash(j);
  if (w.document_hash == DocumentHash::mismatch)
    throw Error(
        label + ": the document does not match its " + kDocumentHashKey +
        "; kiln.json was changed after kiln wrote it (convert or quantize again to get a consistent workspace)");
  if (!j.contains("format_version") || !j["format_version"].is_number_integer())
    throw Error(label + ": 'format_version' is missing");
  if (j["format_version"].get<int>() < 1 || j["format_version"].get<int>() > kWorkspaceFormatVersion)
    throw Error(label + ": format_version " + std::to_string(j["format_version"].get<int>()) +
                " is not supported by this kiln (supports 1 to " + std::to_string(kWorkspaceFormatVersion) + ")");
  if (!j.contains("model")) throw Error(label + ": 'model' is missing");
  w.spec = spec_from_json(j["model"], label);
  if (!j.contains("dtype") || !j["dtype"].is_string()) throw Error(label + ": 'dtype' is missing");
  w.dtype = j["dtype"].get<std::string>();
  workspace_dtype(w.dtype, label);
  auto wf = j.find("weights");
  if (wf == j.end() || !wf->is_object() || !wf->contains("files") || !(*wf)["files"].is_array() ||
      (*wf)["files"].empty())
    throw Error(label + ": 'weights.files' is missing or empty");
  for (const auto& f : (*wf)["files"]) {
    if (!f.is_string()) throw Error(label + ": 'weights.files' must list file names");
    std::string name = f.get<std::string>();
    if (name.find('/') != std::string::npos || name == ".." || name == ".")
      throw Error(label + ": weight file name '" + name + "' must be a plain file name");
    w.weight_files.push_back(name);
  }
  auto m = j.find("manifest");
  if (m == j.end() || !m->is_object()) throw Error(label + ": 'manifest' is missing");
  for (auto it = m->begin(); it != m->end(); ++it) {
    const json& e = it.value();
    if (!e.is_object() || !e.contains("sha256") || !e["sha256"].is_string() || !e.contains("size") ||
        !e["size"].is_number_unsigned())
      throw Error(label + ": manifest entry '" + it.key() + "' needs a sha256 string and a size");
    if (it.key().find('/') != std::string::npos)
      throw Error(label + ": manifest entry '" + it.key() + "' is not a plain file name");
    w.manifest[it.key()] = {e["sha256"].get<std::string>(), e["size"].get<uint64_t>()};
  }
  return w;
}

// ---- writer ----

WorkspaceWriter::WorkspaceWriter(fs::path dir, const std::vector<TensorPlan>& plan, uint64_t max_shard_bytes)
    : dir_(std::move(dir)), shards_(split_into_shards(plan, max_shard_bytes)) {
  for (size_t k = 0; k < shards_.size(); ++k) weight_files_.push_back(weight_file_name(k, shards_.size()));
}

WorkspaceWriter::~WorkspaceWriter() = default;

void WorkspaceWriter::open_shard(size_t k) {
  if (writer_) {
    auto r = writer_->finish();
    manifest_[weight_files_[shard_]] = {r.sha256, r.size};
  }
  shard_ = k;
  tensor_in_shard_ = 0;
  writer_ = std::make_unique<SafetensorsWriter>((dir_ / weight_files_[k]).string(), shards_[k]);
}

void WorkspaceWriter::begin_tensor() {
  if (!started_) {
    started_ = true;
    open_shard(0);
    return;
  }
  if (++tensor_in_shard_ == shards_[shard_].size()) open_shard(shard_ + 1);
}

void WorkspaceWriter::write(const void* bytes, size_t n) { writer_->write(bytes, n); }

void WorkspaceWriter::copy_range(const MappedFile& src, uint64_t offset, size_t n, std::function<void()> after) {
  writer_->copy_range(src, offset, n, std::move(after));
}

void WorkspaceWriter::copy_file(const fs::path& source, const std::string& name) {
  add_file(name, read_text_file(source));
}

void WorkspaceWriter::add_file(const std::string& name, const std::string& content) {
  write_text_file(dir_ / name, content);
  Sha256 h;
  h.update(content.data(), content.size());
  manifest_[name] = {h.hex_digest(), content.size()};
}

ordered_json WorkspaceWriter::finish(ordered_json doc) {
  if (!started_) open_shard(0);
  // Opening any remaining shards makes an incomplete stream fail loudly in SafetensorsWriter::finish.
  while (shard_ + 1 < shards_.size()) open_shard(shard_ + 1);
  auto r = writer_->finish();
  manifest_[weight_files_[shard_]] = {r.sha256, r.size};
  writer_.reset();
  ordered_json m = ordered_json::object();
  for (const auto& [name, e] : manifest_) m[name] = {{"sha256", e.sha256}, {"size", e.size}};
  doc["manifest"] = m;
  doc[kDocumentHashKey] = document_sha256(json::parse(doc.dump()));
  write_text_file(dir_ / kWorkspaceFile, doc.dump(2) + "\n");
  return doc;
}

// ---- reader ----

Workspace::Workspace(const fs::path& dir) : info_(read_workspace_info(dir)) {
  const std::string label = (dir / kWorkspaceFile).string();
  if (info_.document_hash == DocumentHash::missing)
    std::fprintf(stderr,
                 "kiln: warning: %s has no %s (written by an older kiln); its model fields are not covered by "
                 "a hash, and kiln verify reports it\n",
                 label.c_str(), kDocumentHashKey);
  for (const auto& [name, e] : info_.manifest) {
    struct stat st {};
    if (::stat((dir / name).c_str(), &st) != 0)
      throw Error((dir / name).string() + ": listed in the manifest but missing; the workspace is damaged");
    if (!S_ISREG(st.st_mode)) throw Error((dir / name).string() + ": not a regular file; refusing to read it");
    if (uint64_t(st.st_size) != e.size)
      throw Error((dir / name).string() + ": size " + std::to_string(st.st_size) + " differs from the manifest's " +
                  std::to_string(e.size) + "; the workspace is damaged (kiln verify checks every byte)");
  }
  for (const auto& f : info_.weight_files) {
    files_.push_back(std::make_unique<SafetensorsFile>((dir / f).string()));
    const SafetensorsFile* file = files_.back().get();
    for (const auto& t : file->tensors()) {
      auto [it, inserted] = tensors_.emplace(t.name, Tensor{file, &t, file->data(t)});
      if (!inserted) throw Error(file->path() + ": tensor '" + t.name + "' appears in two weight files");
    }
  }
}

Workspace::Workspace(WorkspaceInfo info, std::vector<MemoryTensor> tensors, std::shared_ptr<const void> keepalive)
    : info_(std::move(info)), memory_(std::move(tensors)), keepalive_(std::move(keepalive)) {
  for (const auto& t : memory_) tensors_.emplace(t.info.name, Tensor{nullptr, &t.info, t.bytes});
}

static HfWorkspaceOpener g_hf_opener = nullptr;

void register_hf_workspace_opener(HfWorkspaceOpener opener) { g_hf_opener = opener; }

std::unique_ptr<Workspace> open_workspace(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path.string() + ": no such file or directory");
  if (is_workspace(path)) return std::make_unique<Workspace>(path);
  if (g_hf_opener && fs::is_regular_file(path / "config.json", ec)) return g_hf_opener(path);
  throw Error(path.string() + ": neither a kiln workspace (kiln.json) nor a Hugging Face checkpoint (config.json)");
}

const Workspace::Tensor* Workspace::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const Workspace::Tensor& Workspace::get(const std::string& name) const {
  const Tensor* t = find(name);
  if (!t) throw Error(info_.dir.string() + ": workspace has no tensor '" + name + "'");
  return *t;
}

}  // namespace kiln
