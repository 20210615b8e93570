#include "runtime/model/model.h"

#include <string>

#include "runtime/core/error.h"
#include "runtime/kv/kv_scales.h"
#include "runtime/model/layers/tensor_source.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

namespace {

const Workspace::Tensor& checked(const Workspace& ws, const std::string& name, const std::vector<int64_t>& shape) {
  const Workspace::Tensor& t = ws.get(name);
  if (t.info->shape != shape) {
    auto str = [](const std::vector<int64_t>& s) {
      std::string o = "[";
      for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
      return o + "]";
    };
    throw Error(ws.info().dir.string() + ": tensor " + name + " has shape " + str(t.info->shape) + ", expected " +
                str(shape));
  }
  if (t.info->dtype != DType::F32 && t.info->dtype != DType::F16 && t.info->dtype != DType::BF16)
    throw Error(ws.info().dir.string() + ": tensor " + name + " has dtype " + std::string(dtype_name(t.info->dtype)) +
                "; the runtime needs fp32, fp16 or bf16");
  return t;
}

}  // namespace

Model::Model(const Workspace& ws, Backend& backend)
    : spec_(ws.spec()), graph_(build_model_graph(spec_)), backend_(backend), scratch_(backend) {
  load(ws);
  kv_scales_label_ = ws.info().dir.string();
  if (auto sc = read_kv_static_scales(ws.info())) {
    kv_k_scale_ = std::move(sc->k);
    kv_v_scale_ = std::move(sc->v);
  }
}

Model::~Model() = default;

void Model::load(const Workspace& ws) {
  // Check every tensor the spec implies before packing anything: a corrupt workspace fails fast with a name.
  // Quantized workspaces (docs/int4_layout.md) hold X.qweight/scales/zeros instead of X.weight for covered linears,
  // and lm_head.qweight/scales for an int8 head.
  const WeightQuantization quant = weight_quantization_from_json(ws.info().json, ws.info().dir.string() + "/kiln.json");
  for (const CanonicalTensor& ct : canonical_tensors(spec_, quant)) {
    if (!ct.dtype) {
      checked(ws, ct.name, ct.shape);
      continue;
    }
    const Workspace::Tensor& t = ws.get(ct.name);
    if (t.info->shape != ct.shape || t.info->dtype != *ct.dtype)
      throw Error(ws.info().dir.string() + ": quantized tensor " + ct.name + " has the wrong dtype or shape (needs " +
                  std::string(dtype_name(*ct.dtype)) + " with " + std::to_string(ct.shape[1]) + " columns)");
  }
  const WorkspaceSource src(ws);
  embedding_.load(src, backend_, graph_.embedding);
  blocks_.reserve(graph_.blocks.size());
  for (const BlockGraph& g : graph_.blocks) blocks_.emplace_back().load(src, backend_, g);
  final_norm_.load(src, backend_, graph_.final_norm);
  head_ = pack_output_head(backend_, src, graph_.tied_head ? &embedding_.tokens() : nullptr);
}

Model::ExclusiveUse::ExclusiveUse(Model& m) : model_(m) {
  if (m.in_use_.exchange(true))
    throw Error("the model is in use by another caller at the same time (a model serves one scheduler at a time)");
}

Model::ExclusiveUse::~ExclusiveUse() { model_.in_use_.store(false); }

KvCacheConfig Model::kv_config(int64_t max_tokens, KvDType dtype, int64_t block_size) const {
  KvCacheConfig c;
  c.num_layers = spec_.num_layers;
  c.num_kv_heads = spec_.num_kv_heads;
  c.head_dim = spec_.head_dim;
  c.block_size = block_size;
  c.num_blocks = int32_t((max_tokens + block_size - 1) / block_size);
  c.dtype = dtype;
  if (dtype == KvDType::I8Static) {
    if (kv_k_scale_.empty())
      throw Error(kv_scales_label_ + " has no static INT8 KV scales (" + kKvScalesFile +
                  "); use --kv-cache int8 (online scales) or quantize with --kv-cache int8 --kv-mode static");
    c.k_scale = kv_k_scale_;
    c.v_scale = kv_v_scale_;
  }
  return c;
}

PrefixLmPrompt prefix_lm_prompt(const ModelSpec& spec, std::span<const int32_t> prompt) {
  // modelscope's ChatGLM-6B (get_masks / get_position_ids): the context is everything before the first <sop>, and the
  // generated part's first position is that of the first [gMASK] (of [MASK] when there is no [gMASK]).
  auto find = [&](int64_t id) {
    for (size_t i = 0; i < prompt.size(); ++i)
      if (prompt[i] == id) return int64_t(i);
    return int64_t(-1);
  };
  const int64_t sop = find(spec.prefix_lm_sop_id);
  int64_t anchor = find(spec.prefix_lm_gmask_id);
  if (anchor < 0) anchor = find(spec.prefix_lm_mask_id);
  if (sop < 0 || anchor < 0)
    throw Error(spec.architecture + ": a prompt of this prefix LM must hold [gMASK] (id " +
                std::to_string(spec.prefix_lm_gmask_id) + ") or [MASK] (id " + std::to_string(spec.prefix_lm_mask_id) +
                ") and then <sop> (id " + std::to_string(spec.prefix_lm_sop_id) +
                "); its positions and attention are defined from them");
  return {sop, anchor};
}

const ForwardResult& Model::forward(std::span<BatchEntry> batch, KvCache& cache, ForwardObserver* observer) {
  const int64_t H = spec_.hidden_size, V = spec_.vocab_size;

  // Batch metadata: token ids, positions, cache slots and attention spans.
  std::vector<int32_t> ids, positions, block_positions, seq_of_row, logit_rows;
  std::vector<int64_t> slots;
  std::vector<AttentionSequence> seqs;
  ForwardContext ctx(backend_, spec_, scratch_);
  ForwardResult& result = result_;
  result.first_row.clear();
  for (size_t e = 0; e < batch.size(); ++e) {
    BatchEntry& b = batch[e];
    if (!b.kv) throw Error("forward: batch entry without a KV sequence");
    if (b.tokens.empty()) throw Error("forward: batch entry " + std::to_string(e) + " has no tokens");
    const int64_t start = b.kv->length, n = int64_t(b.tokens.size());
    if (spec_.prefix_lm() && start == 0) {
      // The whole context must be in the sequence's first forward so that it can attend both ways.
      const PrefixLmPrompt p = prefix_lm_prompt(spec_, b.tokens);
      b.kv->bidirectional_prefix = p.sop;
      b.kv->prefix_anchor = p.anchor;
    }
    cache.reserve(*b.kv, start + n);
    const int64_t row0 = int64_t(ids.size());
    result.first_row.push_back(int64_t(logit_rows.size()));
    for (int64_t i = 0; i < n; ++i) {
      ids.push_back(b.tokens[size_t(i)]);
      if (spec_.prefix_lm()) {
        const PrefixLmPosition p = prefix_lm_position({b.kv->bidirectional_prefix, b.kv->prefix_anchor}, start + i);
        positions.push_back(p.position);
        block_positions.push_back(p.block);
      } else {
        positions.push_back(int32_t(start + i));
      }
      seq_of_row.push_back(int32_t(e));
      slots.push_back(cache.slot(*b.kv, start + i));
      if (b.all_logits || i == n - 1) logit_rows.push_back(int32_t(row0 + i));
    }
    const bool fixed_at_prompt = spec_.rope_scaling.type == "qwen_dynamic" && b.prompt_length > 0;
    ctx.seq_lengths.push_back(fixed_at_prompt ? b.prompt_length : start + n);
  }
  const int64_t N = int64_t(ids.size());
  // Attention spans refer to the block tables, which stay put until the next reserve.
  int64_t row = 0;
  for (const BatchEntry& b : batch) {
    const int64_t n = int64_t(b.tokens.size());
    seqs.push_back({row, n, b.kv->length + n, std::span<const int32_t>(b.kv->blocks), b.kv->bidirectional_prefix});
    row += n;
  }
  ctx.cache = &cache;
  ctx.rows = N;
  ctx.ids = ids;
  ctx.positions = positions;
  ctx.block_positions = block_positions;
  ctx.seq_of_row = seq_of_row;
  ctx.slots = slots;
  ctx.seqs = seqs;
  ctx.observer = observer;

  // x is the residual stream, h the normed input of the next layer, y a layer's output. Each residual add is fused
  // with the norm that follows it (Norm::add_forward): the attention norm of block i+1 (or the final norm) runs at
  // the end of block i.
  Buffer& hbuf = scratch_.get(Scratch::Normed, N * H);
  float* x = scratch_.get(Scratch::Residual, N * H).f32();
  float* h = hbuf.f32();
  float* y = scratch_.get(Scratch::LayerOut, N * H).f32();
  embedding_.forward(ctx, x);
  (blocks_.empty() ? final_norm_ : blocks_[0].attn_norm()).forward(backend_, x, h, N);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Norm& next = i + 1 < blocks_.size() ? blocks_[i + 1].attn_norm() : final_norm_;
    blocks_[i].forward(ctx, x, hbuf, y, &next);
  }

  const int64_t R = int64_t(logit_rows.size());
  result.vocab = V;
  result.logits.resize(size_t(R * V));
  Buffer* buf = backend_.host_memory() ? nullptr : &scratch_.get(Scratch::Logits, R * V);
  float* logits = buf ? buf->f32() : result.logits.data();
  backend_.logits(h, H, logit_rows, *head_, logits);
  if (graph_.final_softcap > 0) backend_.softcap(logits, R * V, graph_.final_softcap);
  if (buf) backend_.download(*buf, 0, result.logits.data(), result.logits.size() * sizeof(float));

  for (BatchEntry& b : batch) b.kv->length += int64_t(b.tokens.size());
  return result;
}

}  // namespace kiln
