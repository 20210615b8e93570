#pragma once
// A Hugging Face checkpoint directory: config.json plus safetensors weights, either one model.safetensors or shards
// listed by model.safetensors.index.json, or, when it has no safetensors, torch.save weights (pytorch_model.bin or
// shards listed by pytorch_model.bin.index.json; see torch_bin.h). Every shard is mmapped and validated on open.
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/io/safetensors.h"

namespace kiln {

struct SourceTensor {
  const SafetensorsFile* file;
  const TensorInfo* info;
  const uint8_t* data() const { return file->data(*info); }
};

class HfCheckpoint {
 public:
  // Throws kiln::Error naming the file on anything missing or malformed.
  explicit HfCheckpoint(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  const nlohmann::json& config() const { return config_; }
  // generation_config.json, or an empty object.
  const nlohmann::json& generation_config() const { return generation_config_; }
  // One per weight file of the checkpoint.
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }
  // The index file read ("model.safetensors.index.json", "pytorch_model.bin.index.json"), or empty.
  const std::string& index_file() const { return index_file_; }
  // Every tensor by name, across shards.
  const std::map<std::string, SourceTensor>& tensors() const { return tensors_; }
  const SourceTensor* find(const std::string& name) const;
  uint64_t total_tensor_bytes() const;

 private:
  std::filesystem::path dir_;
  nlohmann::json config_;
  nlohmann::json generation_config_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::vector<std::unique_ptr<SafetensorsFile>> materialized_;  // strided torch.save views copied to memory
  std::string index_file_;
  std::map<std::string, SourceTensor> tensors_;
};

// Parses model.safetensors.index.json text into tensor -> shard file name, refusing shard names that would leave the
// checkpoint directory. `label` names the file in errors.
std::map<std::string, std::string> parse_safetensors_index(const std::string& text, const std::string& label);

// True when the directory looks like an HF checkpoint (has config.json).
bool is_hf_checkpoint(const std::filesystem::path& dir);

}  // namespace kiln
