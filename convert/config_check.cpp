#include "convert/config_check.h"

#include <set>

#include "runtime/core/error.h"

namespace kiln {

namespace {

// The HF name of the family's source for canonical tensor `canonical` (its first part), or "".
std::string source_of(const ArchEntry& arch, const char* canonical) {
  for (const HfPart& p : *arch.parts)
    if (std::string(p.canonical) == canonical && !p.sources.empty()) return p.sources[0];
  return "";
}

// The checkpoint's name for `name`, which some checkpoints of the family store without its optional prefix.
std::string as_stored(const HfCheckpoint& ckpt, const ArchEntry& arch, const std::string& name) {
  const std::string prefix = arch.optional_prefix;
  if (!ckpt.find(name) && !prefix.empty() && name.rfind(prefix, 0) == 0 && ckpt.find(name.substr(prefix.size())))
    return name.substr(prefix.size());
  return name;
}

// The N of a tensor name that starts with `layer_prefix` followed by "N.", or -1.
int64_t layer_index(const std::string& name, const std::string& layer_prefix) {
  if (layer_prefix.empty() || name.rfind(layer_prefix, 0) != 0) return -1;
  size_t i = layer_prefix.size(), j = i;
  while (j < name.size() && j - i < 10 && name[j] >= '0' && name[j] <= '9') ++j;
  if (j > i && j < name.size() && name[j] == '.') return std::stoll(name.substr(i, j - i));
  return -1;
}

}  // namespace

void check_config_against_tensors(const HfCheckpoint& ckpt, const ModelSpec& spec, const ArchEntry& arch,
                                  const std::string& label) {
  validate_spec(spec, label);
  const std::string embedding_name = as_stored(ckpt, arch, source_of(arch, names::kEmbedding));
  // The layer pattern of the attention norm, every family's first per-layer tensor, up to its "{i}".
  std::string layer_prefix = source_of(arch, names::kAttnNorm);
  layer_prefix = layer_prefix.substr(0, layer_prefix.find("{i}"));
  std::string short_prefix = arch.optional_prefix;
  short_prefix = layer_prefix.rfind(short_prefix, 0) == 0 ? layer_prefix.substr(short_prefix.size()) : layer_prefix;
  const SourceTensor* emb = ckpt.find(embedding_name);
  if (!emb) throw Error(ckpt.dir().string() + ": tensor '" + embedding_name + "' (the embedding) is missing");
  const std::vector<int64_t>& shape = emb->info->shape;
  if (shape.size() != 2)
    throw Error(emb->file->path() + ": embedding '" + embedding_name + "' has shape " + shape_string(shape) +
                "; expected [vocab_size, hidden_size]");
  if (shape[0] != spec.vocab_size)
    throw Error(label + ": vocab_size is " + std::to_string(spec.vocab_size) + " but the embedding '" + embedding_name +
                "' has " + std::to_string(shape[0]) + " rows");
  if (shape[1] != spec.hidden_size)
    throw Error(label + ": hidden_size is " + std::to_string(spec.hidden_size) + " but the embedding '" +
                embedding_name + "' has " + std::to_string(shape[1]) + " columns");
  std::set<int64_t> layers;
  for (const auto& [name, t] : ckpt.tensors()) {
    int64_t i = layer_index(name, layer_prefix);
    if (i < 0 && short_prefix != layer_prefix) i = layer_index(name, short_prefix);
    if (i >= 0) layers.insert(i);
  }
  const int64_t present = layers.empty() ? 0 : *layers.rbegin() + 1;
  if (present != spec.num_layers)
    throw Error(
        label + ": num_hidden_layers is " + std::to_string(spec.num_layers) + " but the checkpoint has " +
        (layers.empty() ? std::string("no layer tensors") : "tensors for layers 0.." + std::to_string(present - 1)));
  if (int64_t(layers.size()) != present)
    for (int64_t i = 0; i < present; ++i)
      if (!layers.count(i))
        throw Error(ckpt.dir().string() + ": the checkpoint has no tensors for layer " + std::to_string(i));
}

}  // namespace kiln
