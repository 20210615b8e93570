#include "convert/config_check.h"

#include <set>

#include "runtime/core/error.h"

namespace kiln {

namespace {

// The N of the first ".layers.N." (or a leading "layers.N.") in a tensor name, or -1.
int64_t layer_index(const std::string& name) {
  for (size_t pos = name.find("layers."); pos != std::string::npos; pos = name.find("layers.", pos + 1)) {
    if (pos > 0 && name[pos - 1] != '.') continue;
    size_t i = pos + 7, j = i;
    while (j < name.size() && j - i < 10 && name[j] >= '0' && name[j] <= '9') ++j;
    if (j > i && j < name.size() && name[j] == '.') return std::stoll(name.substr(i, j - i));
  }
  return -1;
}

}  // namespace

void check_config_against_tensors(const HfCheckpoint& ckpt, const ModelSpec& spec, const std::string& embedding_name,
                                  const std::string& label) {
  validate_spec(spec, label);
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
    int64_t i = layer_index(name);
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
