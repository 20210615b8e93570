// Qwen v1 (QWenLMHeadModel, model_type "qwen": Qwen-7B/14B and their Chat models): the Llama block under GPT-2-style
// names (transformer.wte / h.{i}.ln_1 / attn.c_attn / ln_2 / mlp / ln_f), RMSNorm, one c_attn with a bias holding q, k
// and v in equal thirds, and an MLP c_proj(w1(x) * silu(w2(x))) whose branches are intermediate_size / 2 wide (w2 is
// the gate). Two inference-time tricks past seq_length: use_logn_attn scales queries by log(p) / log(seq_length), and
// use_dynamic_ntk raises the RoPE base by Qwen's own NTK factor (runtime/backend/rope.h, "qwen_dynamic").
#include "convert/arch_table.h"
#include "runtime/core/error.h"

namespace kiln {

const std::vector<HfPart> kQwenParts = {
    {names::kEmbedding, {"transformer.wte.weight"}},
    {names::kFinalNorm, {"transformer.ln_f.weight"}},
    {names::kLmHead, {"lm_head.weight"}},
    {names::kAttnNorm, {"transformer.h.{i}.ln_1.weight"}},
    {names::kQkv, {"transformer.h.{i}.attn.c_attn.weight"}},
    {names::kQkvBias, {"transformer.h.{i}.attn.c_attn.bias"}},
    {names::kO, {"transformer.h.{i}.attn.c_proj.weight"}},
    {names::kOBias, {"transformer.h.{i}.attn.c_proj.bias"}},
    {names::kFfnNorm, {"transformer.h.{i}.ln_2.weight"}},
    {names::kGateUp, {"transformer.h.{i}.mlp.w2.weight", "transformer.h.{i}.mlp.w1.weight"}},
    {names::kGateUpBias, {"transformer.h.{i}.mlp.w2.bias", "transformer.h.{i}.mlp.w1.bias"}},
    {names::kDown, {"transformer.h.{i}.mlp.c_proj.weight"}},
    {names::kDownBias, {"transformer.h.{i}.mlp.c_proj.bias"}},
};

// The keys of Qwen's configuration_qwen.py (defaults as there; config.json states them all for the released models).
// The first release (August 2023) spelled four of them the GPT-2 way and named the MLP width ffn_hidden_size; its code
// also defaulted to layer_norm_epsilon 1e-5 and to neither logn attention nor dynamic NTK. A config in that spelling
// is read with those names and defaults; one that mixes both spellings is refused rather than guessed.
void read_qwen_config(const HfConfigReader& r, ModelSpec& s) {
  const bool first_release = r.get("n_embd") != nullptr;
  const char* const kNew[] = {"hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                              "intermediate_size"};
  const char* const kOld[] = {"n_embd", "n_layer", "n_head", "n_positions", "ffn_hidden_size"};
  for (int i = 0; i < 5; ++i)
    if (r.get(kNew[i]) && r.get(kOld[i]))
      r.refuse(kOld[i], std::string("and ") + kNew[i] + " are both set (two spellings of one Qwen setting)");
  auto key = [&](int i) { return first_release ? kOld[i] : kNew[i]; };
  s.vocab_size = r.required_positive("vocab_size");
  s.hidden_size = r.required_positive(key(0));
  s.num_layers = r.required_positive(key(1));
  s.num_heads = s.num_kv_heads = r.required_positive(key(2));
  const int64_t inter = r.required_positive(key(4));
  if (inter % 2) r.refuse(key(4), "must be even (w1 and w2 are each half of it wide)");
  s.intermediate_size = inter / 2;
  s.head_dim = r.optional_positive("kv_channels", 128);
  // modeling_qwen.py splits c_attn's output at hidden_size and reshapes heads of hidden_size / heads.
  if (s.head_dim * s.num_heads != s.hidden_size)
    r.refuse("kv_channels", "times num_attention_heads must equal hidden_size (" + std::to_string(s.hidden_size) + ")");
  s.max_position_embeddings = r.optional_positive(key(3), 8192);
  s.norm_eps = r.optional_number("layer_norm_epsilon", first_release ? 1e-5 : 1e-6);
  s.rope_theta = r.optional_number("rotary_emb_base", 10000.0);
  const double pct = r.optional_number("rotary_pct", 1.0);
  if (!(pct > 0 && pct <= 1)) r.refuse("rotary_pct", "must be in (0, 1]");
  const int64_t rotary = int64_t(double(s.head_dim) * pct);
  if (rotary < 2 || rotary % 2) r.refuse("rotary_pct", "gives an odd or empty rotary dimension");
  if (rotary != s.head_dim) s.rotary_dim = rotary;
  if (r.flag("apply_residual_connection_post_layernorm", false))
    r.refuse("apply_residual_connection_post_layernorm", "true is not supported");
  if (r.get("rope_scaling")) r.refuse("rope_scaling", "is not a Qwen v1 setting (use_dynamic_ntk is)");
  const bool logn = r.flag("use_logn_attn", !first_release), ntk = r.flag("use_dynamic_ntk", !first_release);
  if (logn || ntk) {
    if (!r.get("seq_length"))
      r.refuse("seq_length", "is missing (use_logn_attn and use_dynamic_ntk are relative to it)");
    const int64_t seq_length = r.required_positive("seq_length");
    if (logn) s.logn_attn_length = seq_length;
    if (ntk) {
      s.rope_scaling.type = "qwen_dynamic";
      s.rope_scaling.factor = 1.0;
      s.rope_scaling.original_max_position_embeddings = seq_length;
    }
  }
  s.qkv_bias = true;  // c_attn always has a bias; no_bias governs c_proj and the MLP
  s.o_bias = s.mlp_bias = !r.flag("no_bias", true);
  s.tie_word_embeddings = r.flag("tie_word_embeddings", false);
}

}  // namespace kiln
