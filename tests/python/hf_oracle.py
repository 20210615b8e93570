"""transformers as the oracle: fp32 models whose KV cache stores K and V the way a kiln cache dtype does, and greedy
decoding with its margin-safe prefix.

kiln stores K after RoPE (and after the Qwen3 k-norm) and V as they enter attention, and attention reads every row
back from the cache, the current token's included (docs/kv_cache.md). transformers' DynamicCache.update receives
exactly those tensors ([batch, kv_heads, seq, head_dim]) and returns what attention uses, so rounding them there is
the same experiment as kiln's cache dtype, done by transformers' own attention.
"""
import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache


def hf_fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).float().eval()


class RoundingCache(DynamicCache):
    """A DynamicCache that passes every new K and V row through `store(x, layer, "k" | "v")` before caching it."""

    def __init__(self, store, config):
        super().__init__(config=config)
        self.store = store

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(self.store(key_states, layer_idx, "k"), self.store(value_states, layer_idx, "v"),
                              layer_idx, *args, **kwargs)


def bf16_store(x, layer, which):
    """A bf16 cache: round to nearest even on write, widen on read."""
    return x.to(torch.bfloat16).float()


def int8_static_store(k_scale, v_scale):
    """docs/kv_cache.md, static: per layer and kv head, q = clamp(rint(x / scale), -127, 127), x' = q * scale.
    k_scale, v_scale: float32 [num_layers, num_kv_heads]."""
    scales = {"k": torch.from_numpy(np.asarray(k_scale, np.float32)),
              "v": torch.from_numpy(np.asarray(v_scale, np.float32))}

    def store(x, layer, which):
        s = scales[which][layer].view(1, -1, 1, 1)
        return torch.clamp(torch.round(x / s), -127, 127) * s  # torch.round is half-to-even, like rint
    return store


def int8_online_store(x, layer, which):
    """docs/kv_cache.md, online: per token and kv head, scale = (max - min) / 255, u = clamp(rint((x - min) / scale),
    0, 255), x' = min + u * scale; a constant row (scale 0) is its min."""
    lo = x.amin(-1, keepdim=True)
    scale = (x.amax(-1, keepdim=True) - lo) / 255
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.clamp(torch.round((x - lo) / safe), 0, 255)
    return torch.where(scale > 0, lo + u * scale, lo.expand_as(x))


def cached_logits(model, ids, store=None):
    """Logits [n, vocab] (numpy float32) of one window, K/V passed through `store` (None: fp32 cache)."""
    cache = RoundingCache(store, model.config) if store else None
    with torch.no_grad():
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=store is not None)
    return out.logits[0].float().numpy()


def windowed_logits(model, ids, ctx, store=None):
    """kiln eval's windows: non-overlapping windows of ctx tokens, each run from an empty cache."""
    return np.concatenate([cached_logits(model, ids[b:b + ctx], store) for b in range(0, len(ids), ctx)])


def greedy(model, prompt, n, margin=1e-3, store=None):
    """transformers' greedy continuation of `prompt` (ids, stopping at EOS as kiln does), and the length of its
    prefix that numerical noise below `margin` cannot change: the steps before the first whose top-2 logit margin is
    below `margin`."""
    cache = RoundingCache(store, model.config) if store else None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, past_key_values=cache)
    tokens = out.sequences[0, len(prompt):].tolist()
    safe = len(tokens)
    for i, s in enumerate(out.scores):
        top = torch.topk(s[0].float(), 2).values
        if float(top[0] - top[1]) < margin:
            safe = i
            break
    return tokens, safe
