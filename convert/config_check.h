#pragma once
// config.json against the tensors a checkpoint holds, before anything sized by the config is built: a config that
// claims a billion layers or a vocabulary its embedding does not have is refused here, naming the key, instead of
// allocating a mapping list or workspace plan of that size.
#include <string>

#include "convert/hf_checkpoint.h"
#include "runtime/model/model_spec.h"

namespace kiln {

// Checks the spec's bounds (validate_spec), then that the embedding tensor `embedding_name` is [vocab_size,
// hidden_size] and that the layer indices in the checkpoint's tensor names ("...layers.N....") run exactly over
// 0..num_layers-1. `label` names config.json.
void check_config_against_tensors(const HfCheckpoint& ckpt, const ModelSpec& spec, const std::string& embedding_name,
                                  const std::string& label);

}  // namespace kiln
