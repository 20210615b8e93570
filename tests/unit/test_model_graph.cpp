// The layer-graph data of the canonical spec: workspaces written before the graph fields existed load with the
// Llama block's defaults and are written back byte-identical; every new field round-trips through kiln.json and is
// validated by name; each family's builder wires the layers its spec describes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "runtime/core/error.h"
#include "runtime/model/graph.h"
#include "runtime/model/model_spec.h"

namespace kiln {
namespace {

ModelSpec small(const std::string& family) {
  ModelSpec s;
  s.architecture = "X";
  s.family = family;
  s.vocab_size = 100;
  s.hidden_size = 32;
  s.intermediate_size = 64;
  s.num_layers = 3;
  s.num_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 8;
  s.max_position_embeddings = 128;
  s.eos_token_ids = {2};
  return s;
}

TEST(ModelGraph, OldSpecLoadsWithLlamaDefaultsAndRoundTrips) {
  const nlohmann::ordered_json old = spec_to_json(small("llama"));
  for (const char* key : {"norm", "norm_bias", "mlp_gated", "learned_positions", "sliding_layers", "query_scale",
                          "attn_softcap", "final_softcap", "embedding_scale", "post_attn_norm", "post_ffn_norm"})
    EXPECT_FALSE(old.contains(key)) << key << " is written for a plain Llama spec";
  EXPECT_FALSE(old["rope"].contains("style"));
  const ModelSpec s = spec_from_json(old, "kiln.json");
  EXPECT_EQ(s.norm, "rms");
  EXPECT_TRUE(s.mlp_gated);
  EXPECT_EQ(s.rope_style, "half");
  EXPECT_EQ(s.rotary(), 8);
  EXPECT_EQ(spec_to_json(s).dump(), old.dump());
}

TEST(ModelGraph, GraphFieldsRoundTripAndAreValidated) {
  ModelSpec s = small("gemma2");
  s.norm_plus_one = true;
  s.hidden_act = "gelu_tanh";
  s.rope_style = "interleaved";
  s.rotary_dim = 4;
  s.rope_local_theta = 10000;
  s.sliding_window = 16;
  s.sliding_layers = {true, false, true};
  s.query_scale = 0.25;
  s.attn_softcap = 50;
  s.final_softcap = 30;
  s.embedding_scale = 5.656854;
  s.post_attn_norm = s.post_ffn_norm = true;
  const nlohmann::json j = nlohmann::json::parse(spec_to_json(s).dump());
  const ModelSpec r = spec_from_json(j, "kiln.json");
  EXPECT_EQ(spec_to_json(r).dump(), spec_to_json(s).dump());
  EXPECT_EQ(r.window(0), 16);
  EXPECT_EQ(r.window(1), 0);
  auto bad = [&](const char* key, nlohmann::json value, const char* needle) {
    nlohmann::json b = j;
    if (std::string(key) == "rope.style")
      b["rope"]["style"] = value;
    else
      b[key] = value;
    try {
      spec_from_json(b, "kiln.json");
      ADD_FAILURE() << key << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  bad("norm", "batch", "'norm'");
  bad("hidden_act", "relu", "'hidden_act'");
  bad("rope.style", "spiral", "'style'");
  bad("sliding_layers", nlohmann::json::array({true}), "'sliding_layers'");
  bad("attn_softcap", -1, "'attn_softcap'");
}

TEST(ModelGraph, BuildersWireWhatTheSpecDescribes) {
  const ModelGraph llama = build_model_graph(small("qwen3"));
  ASSERT_EQ(llama.blocks.size(), 3u);
  EXPECT_FALSE(llama.blocks[0].post_attn_norm.has_value());
  EXPECT_EQ(llama.blocks[2].attn.name, "layers.2.attn");
  EXPECT_EQ(llama.blocks[0].attn.rotary_dim, 8);
  EXPECT_FLOAT_EQ(llama.blocks[0].attn.scale, 1.0f / std::sqrt(8.0f));

  ModelSpec g = small("gpt2");
  g.norm = "layer";
  g.norm_bias = true;
  g.mlp_gated = false;
  g.learned_positions = true;
  g.hidden_act = "gelu_tanh";
  const ModelGraph gpt2 = build_model_graph(g);
  EXPECT_EQ(gpt2.embedding.positions, 128);
  EXPECT_EQ(gpt2.blocks[1].attn.rotary_dim, 0);  // no RoPE
  EXPECT_EQ(gpt2.blocks[1].attn_norm.kind, "layer");
  EXPECT_FALSE(gpt2.blocks[1].mlp.gated);
  EXPECT_EQ(gpt2.blocks[1].mlp.act, Activation::GeluTanh);

  ModelSpec gm = small("gemma3");
  gm.post_attn_norm = gm.post_ffn_norm = true;
  gm.sliding_window = 4;
  gm.sliding_layers = {true, true, false};
  gm.rope_local_theta = 10000;
  gm.rope_theta = 1e6;
  gm.final_softcap = 30;
  const ModelGraph gemma = build_model_graph(gm);
  EXPECT_EQ(gemma.blocks[0].post_ffn_norm->name, "layers.0.post_ffn_norm");
  EXPECT_EQ(gemma.blocks[0].attn.rope_theta, 10000);  // local layers: their own base, unscaled
  EXPECT_FALSE(gemma.blocks[0].attn.rope_scaled);
  EXPECT_EQ(gemma.blocks[2].attn.rope_theta, 1e6);
  EXPECT_EQ(gemma.blocks[2].attn.sliding_window, 0);
  EXPECT_FLOAT_EQ(gemma.final_softcap, 30);

  EXPECT_THROW(build_model_graph(small("falcon")), Error);
  ModelSpec wrong = small("llama");
  wrong.learned_positions = true;  // a Llama builder refuses a spec it cannot wire
  EXPECT_THROW(build_model_graph(wrong), Error);
}

TEST(ModelGraph, CanonicalTensorsFollowTheGraphFields) {
  ModelSpec g = small("gpt2");
  g.norm = "layer";
  g.norm_bias = true;
  g.mlp_gated = false;
  g.learned_positions = true;
  g.qkv_bias = g.o_bias = g.mlp_bias = true;
  g.tie_word_embeddings = true;
  std::vector<std::string> names;
  for (const CanonicalTensor& t : canonical_tensors(g)) names.push_back(t.name);
  auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  EXPECT_TRUE(has("pos_embeddings.weight"));
  EXPECT_TRUE(has("layers.0.attn_norm.bias"));
  EXPECT_TRUE(has("layers.2.ffn.up.weight"));
  EXPECT_FALSE(has("layers.2.ffn.gate_up.weight"));
  EXPECT_TRUE(has("norm.bias"));
  EXPECT_FALSE(has("lm_head.weight"));
  const auto mods = linear_modules(g);
  ASSERT_EQ(mods.size(), 12u);
  EXPECT_EQ(mods[2].name, "layers.0.ffn.up");
  EXPECT_EQ(mods[2].in, 32);
  EXPECT_EQ(default_quantized_modules(g), (std::vector<std::string>{"attn.qkv", "attn.o", "ffn.up", "ffn.down"}));
  int64_t layer = -1;
  std::string suffix;
  EXPECT_TRUE(names::split_layer("layers.12.attn.qkv", layer, suffix));
  EXPECT_EQ(layer, 12);
  EXPECT_EQ(suffix, "attn.qkv");
  EXPECT_FALSE(names::split_layer("norm.weight", layer, suffix));
}

}  // namespace
}  // namespace kiln
