#include "convert/hf_checkpoint.h"

#include <set>

#include "convert/torch_bin.h"
#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/io/staging_dir.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace kiln {

static json read_json_object(const fs::path& path) {
  const std::string text = read_text_file(path);
  check_json_depth(text, path.string());
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) throw Error(path.string() + ": not valid JSON");
  if (!j.is_object()) throw Error(path.string() + ": expected a JSON object");
  return j;
}

std::map<std::string, std::string> parse_safetensors_index(const std::string& text, const std::string& label) {
  check_json_depth(text, label);
  json index = json::parse(text, nullptr, false);
  if (index.is_discarded()) throw Error(label + ": not valid JSON");
  if (!index.is_object()) throw Error(label + ": expected a JSON object");
  auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) throw Error(label + ": has no 'weight_map' object");
  std::map<std::string, std::string> out;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string()) throw Error(label + ": weight_map entry '" + it.key() + "' is not a file name");
    std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
      throw Error(label + ": weight_map names an invalid shard file '" + shard + "'");
    out[it.key()] = shard;
  }
  if (out.empty()) throw Error(label + ": weight_map is empty");
  return out;
}

bool is_hf_checkpoint(const fs::path& dir) {
  std::error_code ec;
  return fs::is_regular_file(dir / "config.json", ec);
}

HfCheckpoint::HfCheckpoint(const fs::path& dir) : dir_(dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(dir.string() + ": not a directory");
  if (!fs::is_regular_file(dir / "config.json", ec))
    throw Error(dir.string() + ": no config.json; not a Hugging Face checkpoint directory");
  config_ = read_json_object(dir / "config.json");
  generation_config_ = fs::is_regular_file(dir / "generation_config.json", ec)
                           ? read_json_object(dir / "generation_config.json")
                           : json::object();

  // safetensors when the checkpoint has them; torch.save .bin files (read without executing them) otherwise.
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  std::vector<std::string> shard_names;
  bool torch_bin = false;
  if (fs::is_regular_file(dir / "model.safetensors.index.json", ec)) {
    index_file_ = "model.safetensors.index.json";
  } else if (fs::exists(dir / "model.safetensors", ec)) {
    shard_names.push_back("model.safetensors");
  } else if (fs::is_regular_file(dir / "pytorch_model.bin.index.json", ec)) {
    index_file_ = "pytorch_model.bin.index.json";
    torch_bin = true;
  } else if (fs::exists(dir / "pytorch_model.bin", ec)) {
    shard_names.push_back("pytorch_model.bin");
    torch_bin = true;
  } else {
    throw Error(dir.string() + ": no model.safetensors, model.safetensors.index.json, pytorch_model.bin or " +
                "pytorch_model.bin.index.json");
  }
  if (!index_file_.empty()) {
    const fs::path index_path = dir / index_file_;
    weight_map = parse_safetensors_index(read_text_file(index_path), index_path.string());
    std::set<std::string> seen;
    for (const auto& [tensor, shard] : weight_map)
      if (seen.insert(shard).second) shard_names.push_back(shard);
    std::sort(shard_names.begin(), shard_names.end());
    for (const auto& s : shard_names)
      if (!fs::exists(dir / s, ec))  // present but not a regular file: refused by MappedFile, naming it
        throw Error((dir / s).string() + ": shard named by " + index_file_ + " is missing");
  }

  auto add_tensors = [&](const SafetensorsFile* f) {
    for (const auto& t : f->tensors()) {
      auto [it, inserted] = tensors_.emplace(t.name, SourceTensor{f, &t});
      if (!inserted) throw Error(f->path() + ": tensor '" + t.name + "' also appears in " + it->second.file->path());
    }
  };
  for (const auto& s : shard_names) {
    if (torch_bin) {
      TorchBinFile bin = open_torch_bin((dir / s).string());
      add_tensors(bin.mapped.get());
      shards_.push_back(std::move(bin.mapped));
      if (bin.materialized) {
        add_tensors(bin.materialized.get());
        materialized_.push_back(std::move(bin.materialized));
      }
    } else {
      shards_.push_back(std::make_unique<SafetensorsFile>((dir / s).string()));
      add_tensors(shards_.back().get());
    }
  }
  for (const auto& [name, shard] : weight_map) {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw Error((dir / shard).string() + ": tensor '" + name + "' named by the index is not in the shard");
    if (fs::path(it->second.file->path()).filename() != shard)
      throw Error((dir / shard).string() + ": tensor '" + name + "' is in " + it->second.file->path() +
                  ", not where the index says");
  }
}

const SourceTensor* HfCheckpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

uint64_t HfCheckpoint::total_tensor_bytes() const {
  uint64_t n = 0;
  for (const auto& [_, t] : tensors_) n += t.info->nbytes();
  return n;
}

}  // namespace kiln
