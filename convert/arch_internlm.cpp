// InternLM (InternLMForCausalLM, internlm-chat-7b/20b) and InternLM2 / 2.5 (InternLM2ForCausalLM): both run the Llama
// block. InternLM keeps Llama's tensor names, adds q/k/v/o biases (config key "bias") and reads its RoPE from
// "rotary" ({base, type: origin | dynamic, scaling_factor}). InternLM2 renames every tensor and packs q, k and v in
// one wqkv per KV group (RowOrder::kQkvPerKvGroup); its RoPE keys are Llama's.
#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kInternLm2Parts = {
    {names::kEmbedding, {"model.tok_embeddings.weight"}},
    {names::kFinalNorm, {"model.norm.weight"}},
    {names::kLmHead, {"output.weight"}},
    {names::kAttnNorm, {"model.layers.{i}.attention_norm.weight"}},
    {names::kQkv, {"model.layers.{i}.attention.wqkv.weight"}, false, RowOrder::kQkvPerKvGroup},
    {names::kQkvBias, {"model.layers.{i}.attention.wqkv.bias"}, false, RowOrder::kQkvPerKvGroup},
    {names::kO, {"model.layers.{i}.attention.wo.weight"}},
    {names::kOBias, {"model.layers.{i}.attention.wo.bias"}},
    {names::kFfnNorm, {"model.layers.{i}.ffn_norm.weight"}},
    // w2(silu(w1(x)) * w3(x)): w1 is the gate, w3 the up projection, w2 the down projection.
    {names::kGateUp, {"model.layers.{i}.feed_forward.w1.weight", "model.layers.{i}.feed_forward.w3.weight"}},
    {names::kDown, {"model.layers.{i}.feed_forward.w2.weight"}},
};

namespace {

// InternLM's "rotary": absent in the first internlm-chat-7b revision (RoPE base 10000, unscaled); later ones and
// internlm-20b have {"base": 10000, "type": "dynamic"}, dynamic NTK with an optional scaling_factor (1.0 when
// absent), which past max_position_embeddings raises the base with the sequence length as Llama's "dynamic" does.
// Within max_position_embeddings both types are plain RoPE.
void read_internlm_rotary(const HfConfigReader& r, ModelSpec& s) {
  if (r.get("rope_scaling"))
    r.refuse("rope_scaling", "is not read by InternLM's modeling code (its RoPE is set by 'rotary'); remove it");
  s.rope_theta = 10000.0;
  s.rope_scaling = RopeScaling{};
  const nlohmann::json* rotary = r.get("rotary");
  if (rotary) {
    if (!rotary->is_object()) r.refuse("rotary", "must be an object {\"base\": ..., \"type\": ...}");
    auto type = rotary->find("type");
    if (type == rotary->end() || !type->is_string()) r.refuse("rotary", "needs a 'type' (origin or dynamic)");
    s.rope_theta = r.optional_number(*rotary, "base", 0);
    if (s.rope_theta <= 0) r.refuse("rotary", "needs a positive 'base'");
    if (*type == "dynamic") {
      s.rope_scaling.type = "dynamic";
      s.rope_scaling.factor = r.optional_number(*rotary, "scaling_factor", 1.0);
      if (s.rope_scaling.factor <= 0) r.refuse("rotary", "needs a positive 'scaling_factor'");
      s.rope_scaling.original_max_position_embeddings = s.max_position_embeddings;
    } else if (*type != "origin") {
      r.refuse("rotary", "type " + type->dump() + " is not supported (supported: origin, dynamic)");
    }
  }
  // InternLM's code never reads rope_theta; one that disagrees with the base it does use is a contradiction.
  if (r.get("rope_theta") && r.optional_number("rope_theta", 0) != s.rope_theta)
    r.refuse("rope_theta", "contradicts 'rotary' (InternLM's RoPE base is rotary.base)");
}

}  // namespace

void read_internlm_config(const HfConfigReader& r, ModelSpec& s) {
  read_llama_config(r, s);
  // InternLM's attention has as many key/value heads as query heads; its code ignores num_key_value_heads.
  if (r.get("num_key_value_heads") && s.num_kv_heads != s.num_heads)
    r.refuse("num_key_value_heads", "must equal num_attention_heads (InternLM has no grouped-query attention)");
  read_internlm_rotary(r, s);
  s.qkv_bias = s.o_bias = r.flag("bias", true);  // InternLMConfig's default
  s.mlp_bias = false;
}

void read_internlm2_config(const HfConfigReader& r, ModelSpec& s) {
  read_llama_config(r, s);
  if (s.rope_scaling.type != "none" && s.rope_scaling.type != "linear" && s.rope_scaling.type != "dynamic")
    r.refuse("rope_scaling", "type '" + s.rope_scaling.type + "' is not one InternLM2 has (linear, dynamic)");
  s.qkv_bias = s.o_bias = r.flag("bias", true);  // InternLM2Config's default
  s.mlp_bias = false;
}

}  // namespace kiln
