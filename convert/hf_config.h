#pragma once
// The reverse of spec_from_hf_config: a Hugging Face config.json and generation_config.json for a model spec, for
// exporting a workspace as an HF checkpoint. The workspace keeps the spec, not the source's config.json (whose other
// keys, e.g. initializer_range, do not affect inference), so the config is rebuilt from the spec; converting the
// result gives the same spec back.
#include <nlohmann/json.hpp>

#include "runtime/model/model_spec.h"

namespace kiln {

// config.json keys in a fixed order, with "torch_dtype" set to `torch_dtype` (e.g. "float16").
nlohmann::ordered_json hf_config_from_spec(const ModelSpec& spec, const std::string& torch_dtype);
// A minimal generation_config.json (bos/eos ids), for workspaces whose source had none.
nlohmann::ordered_json hf_generation_config_from_spec(const ModelSpec& spec);

}  // namespace kiln
