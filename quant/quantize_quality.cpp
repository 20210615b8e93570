// The quality report of kiln quantize: the runtime's evaluation path (runtime/engine/evaluate.h) over both
// workspaces, window by window, compared with quant/metrics.h. Both models are loaded at once so that only one
// window of reference logits is held (a whole text's logits would be n x vocab floats).
#include <fstream>
#include <sstream>
#include <vector>

#include "quant/quantize.h"
#include "runtime/core/error.h"
#include "runtime/engine/evaluate.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/path_safety.h"
#include "runtime/text/tokenizer/tokenizer.h"

namespace kiln {

QualityReport compare_workspaces(const std::filesystem::path& quantized, const std::filesystem::path& reference,
                                 const std::filesystem::path& text, int64_t ctx, int64_t max_tokens, unsigned threads,
                                 KvDType quantized_kv) {
  require_regular_file(text);
  std::ifstream in(text, std::ios::binary);
  if (!in) throw Error(text.string() + ": cannot be read (--eval-text)");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (ctx < 2) throw Error("--eval-ctx must be at least 2");
  LoadedModel ref = load_model(reference, threads);
  LoadedModel ours = load_model(quantized, threads);
  // A prefix LM's [gMASK] <sop> prompt comes per window (evaluate_windows), not at the end of the text.
  std::vector<int32_t> tokens =
      Tokenizer::load(locate_tokenizer_files(reference)).encode(ss.str(), !ref.model->spec().prefix_lm());
  if (max_tokens > 0 && int64_t(tokens.size()) > max_tokens) tokens.resize(size_t(max_tokens));
  if (tokens.size() < 2) throw Error(text.string() + ": fewer than 2 tokens to evaluate");
  const int64_t vocab = ref.model->spec().vocab_size;

  LogitComparison cmp;
  std::vector<float> ref_logits;
  for (size_t begin = 0; begin < tokens.size(); begin += size_t(ctx)) {
    const size_t n = std::min(size_t(ctx), tokens.size() - begin);
    std::span<const int32_t> window(tokens.data() + begin, n);
    evaluate_windows(*ref.model, window, ctx, KvDType::F32, [&](int64_t, std::span<const int32_t> w, const float* l) {
      ref_logits.assign(l, l + w.size() * size_t(vocab));
    });
    evaluate_windows(*ours.model, window, ctx, quantized_kv, [&](int64_t, std::span<const int32_t> w, const float* l) {
      // Row i predicts w[i + 1]; the window's last row has no target, as in kiln eval.
      for (size_t i = 0; i + 1 < w.size(); ++i)
        cmp.add(l + i * size_t(vocab), ref_logits.data() + i * size_t(vocab), vocab, w[i + 1]);
    });
  }
  QualityReport r;
  r.cmp = cmp.report();
  r.ctx = ctx;
  r.ppl_increase = r.cmp.ppl / r.cmp.ref_ppl - 1.0;
  return r;
}

}  // namespace kiln
