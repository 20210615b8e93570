// The quality report of kiln quantize, streamed one decoder layer at a time (calib/layer_stream.h): the evaluation
// windows of both models advance side by side, layer by layer, each layer's weights loaded from its workspace, run
// over every window and freed, so that peak memory is one layer plus the two residual streams, whatever the number of
// layers. The windows, KV caches and output head are those of the runtime's evaluation path (runtime/engine/
// evaluate.h, as kiln eval runs it); the logits of both models are compared window by window with quant/metrics.h.
#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "calib/layer_stream.h"
#include "quant/quantize.h"
#include "runtime/core/error.h"
#include "runtime/engine/evaluate.h"
#include "runtime/io/path_safety.h"
#include "runtime/kv/kv_scales.h"
#include "runtime/text/tokenizer/files.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

namespace {

// Whether the output head's tensors (final norm, lm_head or the tied embedding, an int8 head's lm_head.qweight and
// lm_head.scales) hold the same bytes in both. An int8 head in only one of them is a different head.
bool same_head(const Workspace& a, const Workspace& b, const ModelGraph& g) {
  std::vector<std::string> names{g.final_norm.name + ".weight", g.tied_head ? names::kEmbedding : names::kLmHead};
  if (g.final_norm.bias) names.push_back(g.final_norm.name + ".bias");
  for (const char* part : {"qweight", "scales"}) {
    const std::string n = int4_name(names::kLmHead, part);
    if (a.find(n) || b.find(n)) names.push_back(n);
  }
  for (const std::string& n : names) {
    const Workspace::Tensor *x = a.find(n), *y = b.find(n);
    if (!x || !y || x->info->dtype != y->info->dtype || x->info->shape != y->info->shape ||
        std::memcmp(x->data(), y->data(), x->info->nbytes()) != 0)
      return false;
  }
  return true;
}

QualityReport quality_report(const LogitComparisonReport& cmp, int64_t ctx) {
  QualityReport r;
  r.cmp = cmp;
  r.ctx = ctx;
  r.ppl_increase = r.cmp.ppl / r.cmp.ref_ppl - 1.0;
  return r;
}

}  // namespace

QualityReport compare_workspaces(const std::filesystem::path& quantized, const std::filesystem::path& reference,
                                 const std::filesystem::path& text, int64_t ctx, int64_t max_tokens, unsigned threads,
                                 KvDType quantized_kv) {
  require_regular_file(text);
  std::ifstream in(text, std::ios::binary);
  if (!in) throw Error(text.string() + ": cannot be read (--eval-text)");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (ctx < 2) throw Error("--eval-ctx must be at least 2");
  // Opening maps the shards and checks their headers; no weight is read yet.
  const Workspace ref_ws(reference), q_ws(quantized);
  const ModelSpec &rs = ref_ws.spec(), &qs = q_ws.spec();
  if (rs.num_layers != qs.num_layers || rs.hidden_size != qs.hidden_size || rs.vocab_size != qs.vocab_size)
    throw Error(quantized.string() + ": the quantized model's shape differs from " + reference.string());
  // As kiln eval encodes it: a prefix LM's [gMASK] <sop> comes per window (evaluation_prompt), not at the text's end.
  std::vector<int32_t> tokens =
      Tokenizer::load(locate_tokenizer_files(reference)).encode(ss.str(), /*add_special_tokens=*/!rs.prefix_lm());
  if (max_tokens > 0 && int64_t(tokens.size()) > max_tokens) tokens.resize(size_t(max_tokens));
  if (tokens.size() < 2) throw Error(text.string() + ": fewer than 2 tokens to evaluate");
  for (int32_t id : tokens)
    if (id < 0 || id >= ref_ws.spec().vocab_size)
      throw Error(text.string() + ": token id " + std::to_string(id) + " is outside the model's vocabulary");
  const int64_t vocab = ref_ws.spec().vocab_size;
  // Non-overlapping windows of ctx tokens (the last may be shorter), each a fresh sequence after its evaluation
  // prompt: kiln eval's windows. The streams hold prompt and window; `prompt_rows` says where each window starts.
  std::vector<int64_t> windows, lengths, prompt_rows;
  std::vector<int32_t> stream;
  for (size_t begin = 0; begin < tokens.size(); begin += size_t(ctx)) {
    const std::span<const int32_t> window(tokens.data() + begin, std::min(size_t(ctx), tokens.size() - begin));
    const std::vector<int32_t> prompt = evaluation_prompt(rs, window);
    stream.insert(stream.end(), prompt.begin(), prompt.end());
    stream.insert(stream.end(), window.begin(), window.end());
    windows.push_back(int64_t(window.size()));
    prompt_rows.push_back(int64_t(prompt.size()));
    lengths.push_back(int64_t(prompt.size() + window.size()));
  }

  std::unique_ptr<Backend> backend = make_backend("", threads);
  calib::LayerStreamOptions ro, qo;
  ro.batch_tokens = qo.batch_tokens = std::max<int64_t>(ctx, 4096);
  ro.max_memory = qo.max_memory = calib::default_max_memory() / 2;  // two streams
  ro.spill_path = quantized / ".eval-reference-activations";
  qo.spill_path = quantized / ".eval-quantized-activations";
  ro.kv_dtype = KvDType::F32;  // the reference always runs with an fp32 cache
  qo.kv_dtype = quantized_kv;
  if (quantized_kv == KvDType::I8Static) {
    std::optional<KvStaticScales> sc = read_kv_static_scales(q_ws.info());
    if (!sc) throw Error(quantized.string() + " has no static INT8 KV scales (" + kKvScalesFile + ")");
    qo.k_scale = std::move(sc->k);
    qo.v_scale = std::move(sc->v);
  }
  calib::LayerStream ref(ref_ws, *backend, stream, lengths, ro);
  calib::LayerStream ours(q_ws, *backend, stream, lengths, qo);
  for (int64_t l = 0; l < ref.num_layers(); ++l) {
    ref.run_layer(l, WorkspaceSource(ref_ws), nullptr, true);
    ref.release_pages(l);
    ours.run_layer(l, WorkspaceSource(q_ws), nullptr, true);
    ours.release_pages(l);
  }
  // Quantization copies the output head bit for bit: then one copy serves both models.
  const calib::OutputHead ref_head(WorkspaceSource(ref_ws), *backend, ref.graph());
  std::unique_ptr<calib::OutputHead> own_head;
  if (!same_head(ref_ws, q_ws, ref.graph()))
    own_head = std::make_unique<calib::OutputHead>(WorkspaceSource(q_ws), *backend, ours.graph());
  const calib::OutputHead& q_head = own_head ? *own_head : ref_head;
  ref.release_pages(-1);  // the mapped pages read above, now packed in the backend
  ours.release_pages(-1);
  LogitComparison cmp;
  std::vector<float> ref_logits, logits;
  // A few rows of both models at a time: a whole window's logits would be ctx x vocab floats per model.
  const int64_t chunk = 64;
  size_t begin = 0;
  for (size_t w = 0; w < windows.size(); ++w) {
    // Row i predicts token i + 1 of the window; the window's last row has no target, as in kiln eval.
    const int64_t scored = windows[w] - 1;
    for (int64_t r0 = 0; r0 < scored; r0 += chunk) {
      const int64_t n = std::min(chunk, scored - r0);
      ref.logits(int64_t(w), prompt_rows[w] + r0, n, ref_head, ref_logits);
      ours.logits(int64_t(w), prompt_rows[w] + r0, n, q_head, logits);
      for (int64_t i = 0; i < n; ++i)
        cmp.add(logits.data() + i * vocab, ref_logits.data() + i * vocab, vocab, tokens[begin + size_t(r0 + i) + 1]);
    }
    begin += size_t(windows[w]);
  }
  return quality_report(cmp.report(), ctx);
}

}  // namespace kiln
