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
      {"llama", arch::build_llama},
      {"mistral", arch::build_llama},
      {"qwen2", arch::build_llama},
      {"qwen3", arch::build_llama},
      {"gpt2", arch::build_gpt2},
      {"gemma2", arch::build_gemma},
      {"gemma3", arch::build_gemma},
      {"glm", arch::build_glm},
      {"glm4", arch::build_glm},
      {"phi3", arch::build_llama},         // Phi-3's block is Llama's; only its checkpoint layout differs (convert/)
      {"internlm", arch::build_llama},     // InternLM's and InternLM2's blocks are Llama's too
      {"internlm2", arch::build_llama},    // (convert/arch_internlm.cpp)
      {"chatglm", arch::build_glm},        // ChatGLM2/3's original layout is GLM's graph (convert/arch_chatglm.cpp)
      {"chatglm_v1", arch::build_glm_v1},  // ChatGLM-6B: GLM-130B blocks, 2D RoPE, prefix LM
      {"qwen", arch::build_llama},         // Qwen v1 likewise; its logn attention and NTK RoPE are spec data
      {"mixtral", arch::build_llama},      // mixtures of experts: Llama blocks whose MLP routes to experts
      {"qwen2_moe", arch::build_llama},
      {"qwen3_moe", arch::build_llama},
      {"gemma", arch::build_llama},  // Gemma 1: a Llama block with (1 + w) norms, GeGLU and scaled embeddings (data)
  };
  for (const Builder& b : kBuilders)
    if (spec.family == b.family) return b.build(spec);
  throw Error("model family '" + spec.family + "' has no layer graph builder in this kiln");
}

}  // namespace kiln
