#include "runtime/workspace/verify.h"

#include <set>

#include "runtime/core/error.h"
#include "runtime/io/progress.h"
#include "runtime/io/sha256.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;

namespace kiln {

namespace {

void check_manifest(const WorkspaceInfo& info, bool show_progress, VerifyReport& r) {
  std::error_code ec;
  uint64_t total = 0;
  for (const auto& [name, e] : info.manifest) total += e.size;
  Progress progress("verifying", total, show_progress ? ProgressStyle::bar : ProgressStyle::none);
  for (const auto& [name, e] : info.manifest) {
    fs::path p = info.dir / name;
    const fs::file_status st = fs::symlink_status(p, ec);
    if (fs::is_symlink(st)) {
      r.problems.push_back(name + ": a symbolic link; workspace files must be regular files");
      continue;
    }
    if (!fs::is_regular_file(st)) {
      r.problems.push_back(name + (fs::exists(st) ? ": not a regular file" : ": listed in the manifest but missing"));
      continue;
    }
    size_t size = 0;
    std::string h = sha256_file(p.string(), &size);
    r.files_checked++;
    r.bytes_checked += size;
    progress.advance(size);
    if (size != e.size)
      r.problems.push_back(name + ": size " + std::to_string(size) + " differs from the manifest's " +
                           std::to_string(e.size));
    else if (h != e.sha256)
      r.problems.push_back(name + ": sha256 " + h + " differs from the manifest's " + e.sha256);
  }
  progress.finish();
  for (const auto& entry : fs::directory_iterator(info.dir, ec)) {
    std::string name = entry.path().filename().string();
    if (name != kWorkspaceFile && !info.manifest.count(name))
      r.problems.push_back(name + ": not listed in the manifest");
  }
  for (const auto& f : info.weight_files)
    if (!info.manifest.count(f)) r.problems.push_back(f + ": weight file is not covered by the manifest");
}

void check_tensors(const WorkspaceInfo& info, VerifyReport& r) {
  Workspace ws(info.dir);  // parses and validates every shard header
  DType dtype = workspace_dtype(info.dtype, kWorkspaceFile);
  std::set<std::string> expected;
  // A quantized workspace (docs/int4_layout.md) lists int4 parts, with their fixed dtypes, for its quantized linears,
  // and an int8 head's lm_head.qweight / lm_head.scales.
  const WeightQuantization quant = weight_quantization_from_json(info.json, (info.dir / kWorkspaceFile).string());
  for (const CanonicalTensor& c : canonical_tensors(info.spec, quant)) {
    expected.insert(c.name);
    const Workspace::Tensor* t = ws.find(c.name);
    if (!t) {
      r.problems.push_back("tensor '" + c.name + "' is missing");
      continue;
    }
    if (t->info->shape != c.shape)
      r.problems.push_back("tensor '" + c.name + "' has shape " + shape_string(t->info->shape) + ", the spec needs " +
                           shape_string(c.shape));
    if (c.dtype && t->info->dtype != *c.dtype)
      r.problems.push_back("tensor '" + c.name + "' is " + std::string(dtype_name(t->info->dtype)) +
                           ", the quantized layout needs " + std::string(dtype_name(*c.dtype)));
    else if (!c.dtype && t->info->dtype != dtype)
      r.problems.push_back("tensor '" + c.name + "' is " + std::string(dtype_name(t->info->dtype)) +
                           ", kiln.json says " + info.dtype);
  }
  for (const auto& [name, t] : ws.tensors())
    if (!expected.count(name)) r.problems.push_back("tensor '" + name + "' is not part of the model spec");
}

// The tokenizer files were checked when they were copied; a workspace assembled or edited by hand is checked here.
void check_tokenizer(const WorkspaceInfo& info, VerifyReport& r) {
  auto t = info.json.find("tokenizer");
  if (t == info.json.end() || !t->is_object() || !t->contains("files") || (*t)["files"].empty()) return;
  try {
    Tokenizer::load(locate_tokenizer_files(info.dir));
  } catch (const Error& e) {
    r.problems.push_back(std::string("the tokenizer does not load: ") + e.what());
  }
}

}  // namespace

VerifyReport verify_workspace(const fs::path& dir, bool show_progress) {
  VerifyReport r;
  // An unreadable kiln.json, or one that does not match its hash, is an error rather than a report line.
  WorkspaceInfo info = read_workspace_info(dir);
  if (info.document_hash == DocumentHash::missing)
    r.problems.push_back(std::string(kWorkspaceFile) + ": no " + kDocumentHashKey +
                         " (written by an older kiln): its model fields are not covered by a hash; convert again");
  const size_t before = r.problems.size();
  check_manifest(info, show_progress, r);
  if (r.problems.size() > before) return r;  // structure checks would only repeat what a corrupt file already explains
  try {
    check_tensors(info, r);
  } catch (const Error& e) {
    r.problems.push_back(e.what());
  }
  check_tokenizer(info, r);
  return r;
}

}  // namespace kiln
