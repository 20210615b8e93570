#pragma once
// config.json against the tensors a checkpoint holds, before anything sized by the config is built: a config that
// claims a billion layers or a vocabulary its embedding does not have is refused here, naming the key, instead of
// allocating a mapping list or workspace plan of that size.
#include <string>

#include "convert/arch_table.h"
#include "convert/hf_checkpoint.h"
#include "runtime/model/model_spec.h"

namespace kiln {

// Checks the spec's bounds (validate_spec), then that the family's embedding tensor is [vocab_size, hidden_size] and
// that the layer indices in the checkpoint's tensor names (the family's layer pattern, e.g. "model.layers.{i}." or
// GPT-2's "transformer.h.{i}.") run exactly over 0..num_layers-1. `label` names config.json.
void check_config_against_tensors(const HfCheckpoint& ckpt, const ModelSpec& spec, const ArchEntry& arch,
                                  const std::string& label);

}  // namespace kiln
