#!/usr/bin/env python3
"""Writes tiny checkpoints with transformers, one per architecture variant kiln claims, for the oracle tests.

Every checkpoint is random-initialised with a fixed seed and written by `save_pretrained`, so kiln's reading of the
format is checked against what transformers really writes. Variants cover fp32 and bf16, sharded and single-file
weights, tied embeddings, qkv/o/mlp biases, q/k norms and every rope scaling type. Each directory gets the real test
tokenizer whose family it belongs to (llama2 for Llama/Mistral, qwen3 for Qwen).

Usage: scripts/make_fixtures.py --out build/fixtures --tokenizers DIR_WITH_llama2_AND_qwen3
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Glm4Config,
                          Glm4ForCausalLM, GlmConfig, GlmForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA_VOCAB = 32000    # the llama2 test tokenizer
QWEN_VOCAB = 151936    # the qwen3 test tokenizer (padded vocabulary, as in the real models)
SMALL = dict(vocab_size=LLAMA_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA = dict(vocab_size=LLAMA_VOCAB, head_dim=16, query_pre_attn_scalar=16, sliding_window=16, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
# GPT-2 takes its own config keys (n_embd, n_layer, ...); the llama2 test tokenizer stands in for GPT-2's BPE.
GPT2_COMMON = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=LLAMA_VOCAB, bos_token_id=1,
                   eos_token_id=2)

# name -> (config class, model class, config overrides, dtype, max_shard_size or None, tokenizer)
VARIANTS = {
    "llama-fp32-sharded": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=LLAMA_VOCAB), torch.float32, "100KB", "llama2"),
    "llama-bf16": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=LLAMA_VOCAB), torch.bfloat16, None, "llama2"),
    "llama-bias-linear-rope": (LlamaConfig, LlamaForCausalLM,
                               dict(vocab_size=LLAMA_VOCAB, attention_bias=True, mlp_bias=True,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}), torch.float32, None, "llama2"),
    "llama-dynamic-rope": (LlamaConfig, LlamaForCausalLM,
                           dict(vocab_size=LLAMA_VOCAB, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                           torch.float32, None, "llama2"),
    "llama3-rope-bf16": (LlamaConfig, LlamaForCausalLM,
                         dict(vocab_size=LLAMA_VOCAB, rope_theta=500000.0,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                         torch.bfloat16, None, "llama2"),
    "llama-tied-fp32": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=LLAMA_VOCAB, tie_word_embeddings=True),
                        torch.float32, None, "llama2"),
    "mistral-fp32-sharded": (MistralConfig, MistralForCausalLM, dict(vocab_size=LLAMA_VOCAB, sliding_window=32),
                             torch.float32, "200KB", "llama2"),
    "mistral-bf16": (MistralConfig, MistralForCausalLM, dict(vocab_size=LLAMA_VOCAB, sliding_window=None),
                     torch.bfloat16, None, "llama2"),
    "qwen2-tied-fp32": (Qwen2Config, Qwen2ForCausalLM, dict(vocab_size=QWEN_VOCAB, tie_word_embeddings=True),
                        torch.float32, None, "qwen3"),
    "qwen2-bf16-sharded": (Qwen2Config, Qwen2ForCausalLM, dict(vocab_size=QWEN_VOCAB, tie_word_embeddings=False),
                           torch.bfloat16, "2MB", "qwen3"),
    "qwen3-fp32": (Qwen3Config, Qwen3ForCausalLM, dict(vocab_size=QWEN_VOCAB, head_dim=32, tie_word_embeddings=False),
                   torch.float32, None, "qwen3"),
    "qwen3-bf16-tied": (Qwen3Config, Qwen3ForCausalLM, dict(vocab_size=QWEN_VOCAB, head_dim=32, tie_word_embeddings=True),
                        torch.bfloat16, None, "qwen3"),
    # GPT-2: tied head and tanh GELU (gelu_new) by default; one variant untied with exact GELU and a wider MLP.
    "gpt2-fp32": (GPT2Config, GPT2LMHeadModel, dict(), torch.float32, None, "llama2"),
    "gpt2-bf16-sharded": (GPT2Config, GPT2LMHeadModel, dict(), torch.bfloat16, "300KB", "llama2"),
    "gpt2-gelu-untied-fp32": (GPT2Config, GPT2LMHeadModel,
                              dict(activation_function="gelu", n_inner=96, tie_word_embeddings=False),
                              torch.float32, None, "llama2"),
    # Gemma 2: one sliding layer (window 16) and one global; soft-caps small enough to bite on random weights.
    "gemma2-fp32": (Gemma2Config, Gemma2ForCausalLM, dict(GEMMA, attn_logit_softcapping=1.0,
                                                          final_logit_softcapping=0.5), torch.float32, None, "llama2"),
    "gemma2-bf16-sharded": (Gemma2Config, Gemma2ForCausalLM, dict(GEMMA), torch.bfloat16, "200KB", "llama2"),
    # Gemma 3: q/k norms, a local RoPE base for the sliding layer and linear scaling on the global one.
    "gemma3-fp32": (Gemma3TextConfig, Gemma3ForCausalLM,
                    dict(GEMMA, layer_types=["sliding_attention", "full_attention"],
                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 100000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
                    torch.float32, None, "llama2"),
    # GLM-4: interleaved RoPE on half of each head, q/k/v biases, fused gate_up_proj; GLM-4-0414 adds post-norms.
    "glm-fp32": (GlmConfig, GlmForCausalLM, dict(SMALL, head_dim=16), torch.float32, None, "llama2"),
    "glm4-fp32": (Glm4Config, Glm4ForCausalLM, dict(SMALL, head_dim=16), torch.float32, None, "llama2"),
    "glm4-bf16-sharded": (Glm4Config, Glm4ForCausalLM, dict(SMALL, head_dim=16), torch.bfloat16, "200KB", "llama2"),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window, partial rotary in one variant.
    "phi3-fp32": (Phi3Config, Phi3ForCausalLM, dict(SMALL, sliding_window=24), torch.float32, None, "llama2"),
    "phi3-partial-bf16-sharded": (Phi3Config, Phi3ForCausalLM, dict(SMALL, partial_rotary_factor=0.5),
                                  torch.bfloat16, "200KB", "llama2"),
    # Appended, not inserted: each variant's seed is its position, so the others keep their weights.
    "llama-fp16": (LlamaConfig, LlamaForCausalLM, dict(vocab_size=LLAMA_VOCAB), torch.float16, None, "llama2"),
}


def randomize(model, seed):
    """Replaces every parameter with seeded noise: default init leaves norms at exactly 1 and biases at 0, which
    would let a converter that mixes tensors up pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def make(name, out, tokenizers, seed):
    cfg_cls, model_cls, overrides, dtype, shard, tok = VARIANTS[name]
    config = cfg_cls(**{**(GPT2_COMMON if cfg_cls is GPT2Config else COMMON), **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    randomize(model, seed)
    model = model.to(dtype)
    dst = out / name
    if dst.exists():
        shutil.rmtree(dst)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(dst, safe_serialization=True, **kwargs)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizers / tok / f, dst / f)
    return {"name": name, "architecture": config.architectures[0] if config.architectures else model_cls.__name__,
            "dtype": str(dtype).replace("torch.", ""), "sharded": shard is not None, "tokenizer": tok,
            "tied": bool(config.tie_word_embeddings)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizers", required=True, type=Path, help="directory with llama2/ and qwen3/ tokenizers")
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for name in args.only or VARIANTS:
        index.append(make(name, args.out, args.tokenizers, seed=1000 + list(VARIANTS).index(name)))
        print(f"{args.out / name}: written")
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
