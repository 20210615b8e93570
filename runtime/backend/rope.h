#pragma once
// RoPE inverse frequencies for every scaling variant kiln supports, computed as transformers'
// modeling_rope_utils.py does (in fp32, so that angles match bit for bit where possible):
//  - none:    inv_freq[i] = 1 / theta^(2i/d)
//  - linear:  inv_freq / factor
//  - dynamic: NTK-aware: theta is scaled by (factor * L / max_pos - (factor - 1))^(d / (d - 2)) where L is the
//             sequence length seen by the forward (max position + 1). L <= max_pos gives the unscaled frequencies.
//             transformers recomputes this on every forward from the largest position of the batch; kiln does it
//             per sequence (what a batch of one gives in transformers). Cached keys keep the rotation they were
//             written with, exactly as in transformers' KV cache.
//  - qwen_dynamic: Qwen v1's use_dynamic_ntk: theta is scaled by alpha^(d / (d - 2)) where alpha = 1 up to
//             seq_length (original_max_position_embeddings) positions, then 3, 7, 15, ... each time L doubles. Qwen
//             fixes alpha from the length of a sequence's first forward (its prompt) for the whole generation, so
//             Model::forward passes the prompt length as L when the caller gives it (BatchEntry::prompt_length).
//  - llama3:  long wavelengths divided by factor, short ones kept, a smooth blend in between.
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/model/model_spec.h"

namespace kiln {

// rotary/2 inverse frequencies (spec.rotary(): head_dim unless RoPE is partial) for a forward whose sequence reaches
// `seq_len` positions. `theta` > 0 replaces spec.rope_theta (the local base of Gemma 3's sliding-window layers);
// `scaled` false gives the unscaled frequencies (Gemma 3's local layers ignore the global scaling).
std::vector<float> rope_inv_freq(const ModelSpec& spec, int64_t seq_len, double theta = 0, bool scaled = true);

// Qwen's NTK alpha for a context of `len` positions over a training length of `seq_length`.
double qwen_ntk_alpha(int64_t len, int64_t seq_length);

// Keys written for a prompt of `prompt_length` tokens are rotated by frequencies that depend on it for Qwen's dynamic
// NTK (through its alpha): this names that dependence ("" when none), so that prefix caches only hand a prompt K/V
// written under the same frequencies.
std::string rope_prompt_key(const ModelSpec& spec, int64_t prompt_length);

// True when the frequencies depend on seq_len (dynamic NTK scaling, HF's or Qwen's).
inline bool rope_depends_on_length(const ModelSpec& spec) {
  return spec.rope_scaling.type == "dynamic" || spec.rope_scaling.type == "qwen_dynamic";
}

}  // namespace kiln
