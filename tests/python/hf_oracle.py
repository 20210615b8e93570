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


def kiln_int8_activations(gs, isa=None):
    """Whether kiln's CPU int4 matmul rounds activations to int8 on this machine (KILN_CPU_ISA=isa): it takes the
    int8-activation (VNNI) layout (docs/int4_layout.md) with any vector ISA (AVX2, FMA, F16C at least) when
    gs % 16 == 0; only the scalar kernels keep fp32 activations."""
    if isa == "scalar" or gs % 16:
        return False
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {"avx2", "fma", "f16c"} <= flags


def round_linear_inputs_int8(model, gs):
    """The oracle of kiln's int8 activations: every decoder-layer linear's input is rounded per (row, group of gs
    inputs) as documented: d = max|x| / 127, q = round(x * (1 / d)) (half to even, the reciprocal rounded to fp32),
    x -> d * q. The LM head is not an int4
    linear and keeps fp32 inputs. Returns the model (hooks added in place)."""
    def hook(_module, args):
        x = args[0]
        g = x.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)
        d = g.abs().amax(-1, keepdim=True) / 127.0
        q = torch.where(d > 0, torch.round(g * (1.0 / torch.where(d > 0, d, 1.0))), 0.0)
        return ((q * d).reshape(x.shape),)
    for layer in model.model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(hook)
    return model


def int8_logits_close(ours, ref, tol, far_tol=5e-2):
    """kiln's logits [n, vocab] against round_linear_inputs_int8's. An activation sitting on a rounding boundary may
    round to the neighbouring int8 step after upstream fp32 noise (~1e-6): that position's logits move by up to
    ~1e-2 and, when the flip feeds the KV cache, so do the later positions'. So either at most 10% of the positions
    differ by more than tol, or the first half of them match within tol; none may differ by more than far_tol. Had
    kiln and the oracle disagreed on the rounding method, (nearly) every position would differ."""
    per_pos = np.abs(np.asarray(ours) - np.asarray(ref)).max(-1)
    far = np.flatnonzero(per_pos > tol)
    lead = int(far[0]) if far.size else per_pos.size
    few = far.size <= 0.1 * per_pos.size
    return bool((few or lead >= per_pos.size / 2) and per_pos.max() <= far_tol)
