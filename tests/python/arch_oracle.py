"""The canonical tensors (docs/workspace.md) of the non-Llama fixture families, built from transformers' own state
dict, independently of kiln's convert/arch_*.cpp tables: GPT-2's Conv1D weights transposed, Gemma's and GLM-4-0414's
post-norms, GLM's and Phi-3's fused gate_up_proj / qkv_proj taken whole."""
import torch


def _llama_like(sd, cfg, out, post_norms):
    for i in range(cfg.num_hidden_layers):
        p, L = f"model.layers.{i}.", f"layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        out[L + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        if a + "qkv_proj.weight" in sd:
            out[L + "attn.qkv.weight"] = sd[a + "qkv_proj.weight"]
        else:
            out[L + "attn.qkv.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        if a + "q_proj.bias" in sd:
            out[L + "attn.qkv.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        if a + "q_norm.weight" in sd:
            out[L + "attn.q_norm.weight"] = sd[a + "q_norm.weight"]
            out[L + "attn.k_norm.weight"] = sd[a + "k_norm.weight"]
        out[L + "attn.o.weight"] = sd[a + "o_proj.weight"]
        for canon, hf in post_norms.items():
            out[L + canon] = sd[p + hf]
        if m + "gate_up_proj.weight" in sd:
            out[L + "ffn.gate_up.weight"] = sd[m + "gate_up_proj.weight"]
        else:
            out[L + "ffn.gate_up.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
        out[L + "ffn.down.weight"] = sd[m + "down_proj.weight"]


def canonical_from_state_dict(arch, sd, cfg):
    """Canonical name -> tensor for `arch`, or None for the Llama layout (handled by test_convert itself)."""
    out = {}
    if arch == "GPT2LMHeadModel":
        t = "transformer."
        out["tok_embeddings.weight"] = sd[t + "wte.weight"]
        out["pos_embeddings.weight"] = sd[t + "wpe.weight"]
        for i in range(cfg.n_layer):
            h, L = f"{t}h.{i}.", f"layers.{i}."
            for canon, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[L + canon + ".weight"] = sd[h + hf + ".weight"]
                out[L + canon + ".bias"] = sd[h + hf + ".bias"]
            for canon, hf in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"), ("ffn.up", "mlp.c_fc"),
                              ("ffn.down", "mlp.c_proj")):
                out[L + canon + ".weight"] = sd[h + hf + ".weight"].t().contiguous()  # Conv1D is [in, out]
                out[L + canon + ".bias"] = sd[h + hf + ".bias"]
        out["norm.weight"], out["norm.bias"] = sd[t + "ln_f.weight"], sd[t + "ln_f.bias"]
    elif arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        _llama_like(sd, cfg, out, {"post_attn_norm.weight": "post_attention_layernorm.weight",
                                   "post_ffn_norm.weight": "post_feedforward_layernorm.weight"})
        for i in range(cfg.num_hidden_layers):  # Gemma's MLP pre-norm is pre_feedforward_layernorm
            out[f"layers.{i}.ffn_norm.weight"] = sd[f"model.layers.{i}.pre_feedforward_layernorm.weight"]
    elif arch in ("GlmForCausalLM", "Glm4ForCausalLM", "Phi3ForCausalLM"):
        post = {"post_attn_norm.weight": "post_self_attn_layernorm.weight",
                "post_ffn_norm.weight": "post_mlp_layernorm.weight"} if arch == "Glm4ForCausalLM" else {}
        _llama_like(sd, cfg, out, post)
        for i in range(cfg.num_hidden_layers):
            out[f"layers.{i}.ffn_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
    else:
        return None
    if not arch.startswith("GPT2"):
        out["tok_embeddings.weight"] = sd["model.embed_tokens.weight"]
        out["norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
