// The family -> builder table: the one place that maps a spec's family to the code that wires its layers.
#include "runtime/core/error.h"
#include "runtime/model/arch/common.h"

namespace kiln {

ModelGraph build_model_graph(const ModelSpec& spec) {
  struct Builder {
    const char* family;
    ModelGraph (*build)(const ModelSpec&);
  };
  static const Builder kBuilders[] = {
      {"llama", arch::build_llama},   {"mistral", arch::build_llama},   {"qwen2", arch::build_llama},
      {"qwen3", arch::build_llama},   {"gpt2", arch::build_gpt2},       {"gemma2", arch::build_gemma},
      {"gemma3", arch::build_gemma},  {"glm", arch::build_glm},         {"glm4", arch::build_glm},
      {"phi3", arch::build_llama},  // Phi-3's block is Llama's; only its checkpoint layout differs (convert/)
      {"mixtral", arch::build_llama}, {"qwen2_moe", arch::build_llama}, {"qwen3_moe", arch::build_llama},
  };
  for (const Builder& b : kBuilders)
    if (spec.family == b.family) return b.build(spec);
  throw Error("model family '" + spec.family + "' has no layer graph builder in this kiln");
}

}  // namespace kiln
