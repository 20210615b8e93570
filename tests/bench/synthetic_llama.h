#pragma once
// An in-memory Llama workspace of a given shape with synthetic weights, for benchmarks on machines without a real
// checkpoint (a GPU session has no Llama-7B to read). Dense tensors are fp16 (a tile of small pseudo-random values
// repeated; norms are 1); int4 workspaces quantize every linear of the layer stack (group 128) with random codes, zero
// 8 and scale 0.01. The numbers are meaningless; the bytes moved per decode step are those of the real model.
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/model/model_spec.h"
#include "runtime/workspace/workspace.h"

namespace kiln::bench {

inline ModelSpec llama_spec(int64_t hidden, int64_t inter, int64_t layers, int64_t heads, int64_t vocab) {
  ModelSpec s;
  s.architecture = "LlamaForCausalLM";
  s.family = "llama";
  s.vocab_size = vocab;
  s.hidden_size = hidden;
  s.intermediate_size = inter;
  s.num_layers = layers;
  s.num_heads = heads;
  s.num_kv_heads = heads;
  s.head_dim = hidden / heads;
  s.max_position_embeddings = 4096;
  s.norm_eps = 1e-5;
  s.bos_token_id = 1;
  s.eos_token_ids = {2};
  return s;
}

// Llama-2-7B's shapes.
inline ModelSpec llama7b_spec() { return llama_spec(4096, 11008, 32, 32, 32000); }

inline std::unique_ptr<Workspace> synthetic_workspace(const ModelSpec& spec, bool int4) {
  WeightQuantization q;
  if (int4) {
    q.method = "rtn";
    q.bits = 4;
    q.group_size = 128;
    q.zero_point = true;
    q.modules = default_quantized_modules();
  }
  WorkspaceInfo info;
  info.dir = std::string("<synthetic ") + (int4 ? "int4" : "fp16") + " llama>";
  info.spec = spec;
  info.dtype = "fp16";
  info.json = {{"quantization", {{"weights", weight_quantization_to_json(q)}}}};

  const std::vector<CanonicalTensor> plan = canonical_tensors(spec, q);
  std::vector<Workspace::MemoryTensor> tensors;
  size_t total = 0;
  for (const CanonicalTensor& ct : plan) {
    TensorInfo t;
    t.name = ct.name;
    t.dtype = ct.dtype.value_or(DType::F16);
    t.shape = ct.shape;
    t.begin = total;
    t.end = total + t.numel() * dtype_size(t.dtype);
    total = (t.end + 63) / 64 * 64;
    tensors.push_back({t, nullptr});
  }
  auto storage = std::make_shared<std::vector<uint8_t>>(total);
  uint8_t* base = storage->data();

  std::mt19937 rng(7);
  std::vector<uint16_t> tile(4096);  // fp16 values in [-0.02, 0.02]
  std::uniform_real_distribution<float> small(-0.02f, 0.02f);
  for (uint16_t& h : tile) h = f32_to_f16(small(rng));
  std::vector<uint8_t> codes(1 << 16);
  for (uint8_t& c : codes) c = uint8_t(rng());
  auto fill = [](uint8_t* dst, size_t n, const void* src, size_t src_n) {
    for (size_t i = 0; i < n; i += src_n) std::memcpy(dst + i, src, std::min(src_n, n - i));
  };
  const uint16_t one = f32_to_f16(1.0f), scale = f32_to_f16(0.01f);
  for (Workspace::MemoryTensor& t : tensors) {
    uint8_t* p = base + t.info.begin;
    const size_t n = t.info.nbytes();
    const std::string& name = t.info.name;
    const bool norm = name.find("norm.weight") != std::string::npos;
    if (name.size() > 8 && name.compare(name.size() - 8, 8, ".qweight") == 0) {
      fill(p, n, codes.data(), codes.size());
    } else if (name.size() > 6 && name.compare(name.size() - 6, 6, ".zeros") == 0) {
      std::memset(p, 8, n);
    } else if (name.size() > 7 && name.compare(name.size() - 7, 7, ".scales") == 0) {
      fill(p, n, &scale, 2);
    } else if (norm) {
      fill(p, n, &one, 2);
    } else {
      fill(p, n, tile.data(), tile.size() * 2);
    }
    t.info.begin = 0;  // in-memory tensors: bytes points at the data, begin/end only give the size
    t.info.end = n;
    t.bytes = p;
  }
  return std::make_unique<Workspace>(std::move(info), std::move(tensors), storage);
}

}  // namespace kiln::bench
