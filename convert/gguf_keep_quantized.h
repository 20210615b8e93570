#pragma once
// kiln convert FILE.gguf --keep-quantized: linear weights stored in a ggml type that kiln's int4 layout
// (docs/int4_layout.md) holds exactly are repacked as int4 instead of being dequantized: codes, scales and zero
// points carried over bit for bit, nothing requantized. Exact: Q4_0 (w = d·(q - 8): scale d, zero point 8), and Q4_1
// (w = d·q + m) wherever m = -z·d for an integer z in 0..15. See docs/gguf.md.
#include <string>
#include <vector>

#include "convert/converter.h"
#include "convert/gguf_arch.h"

namespace kiln::gguf {

// The quantization block of a workspace keeping `model`'s linear weights: RTN int4, group 32, every default module.
// Throws one line naming the file, the tensor and its type when one of them has no exact int4 form.
WeightQuantization kept_int4_quantization(const Model& model, const ModelSpec& spec,
                                          const std::vector<CanonicalTensor>& canonical,
                                          const std::vector<Mapping>& mappings);

// Writes X.qweight, X.scales and X.zeros of one kept linear (three tensors, in that order).
void emit_kept_int4(const Model& model, const Mapping& mapping, WorkspaceWriter& writer, TensorSink& sink);

// The Q8_0 tensor kept as an int8 LM head (docs/int4_layout.md: llama.cpp's Q8_0 block is kiln's int8 head block,
// one fp16 scale and 32 codes): the output head, or for a model with tied embeddings the embedding (the head is then
// its own copy, and the embedding is dequantized as usual). nullptr when that tensor is not Q8_0.
const SourceTensor* kept_int8_head(const Model& model, const ModelSpec& spec, const Architecture& arch);

// Writes lm_head.qweight and lm_head.scales (two tensors, in that order) from the Q8_0 tensor `head`.
void emit_kept_int8_head(const SourceTensor& head, WorkspaceWriter& writer, TensorSink& sink);

}  // namespace kiln::gguf
