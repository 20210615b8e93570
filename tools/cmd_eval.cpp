// kiln eval PATH (--text F | --tokens T.json) [--ctx 512] [--max-tokens N] [--save-logits L] [--ref-logits L] [--json]
// Perplexity over non-overlapping windows, optionally saving every logits row or comparing against saved ones.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>

#include "quant/metrics.h"
#include "runtime/core/error.h"
#include "runtime/core/json_limits.h"
#include "runtime/engine/evaluate.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/safetensors.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"
#include "tools/flag_checks.h"

namespace kiln::tools {
namespace {

struct EvalOptions {
  std::string path, text, tokens, save_logits, ref_logits, kv_cache = "auto";
  int64_t ctx = 512, max_tokens = 0;
  unsigned threads = 0;
  bool verify = false;
  bool json = false;
};

std::string read_file(const std::string& path) {
  require_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<int32_t> read_token_list(const std::string& path) {
  const std::string text = read_file(path);
  check_json_depth(text, path);
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_array()) throw Error(path + ": expected a JSON list of token ids");
  std::vector<int32_t> ids;
  for (const auto& v : j) {
    if (!v.is_number_integer()) throw Error(path + ": expected integer token ids, got " + v.dump());
    ids.push_back(v.get<int32_t>());
  }
  return ids;
}

// The saved logits of an earlier run, checked against this run's tokens.
struct RefLogits {
  std::unique_ptr<SafetensorsFile> file;
  const float* logits = nullptr;
  RefLogits(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab) {
    file = std::make_unique<SafetensorsFile>(path);
    const TensorInfo* t = file->find("tokens");
    const TensorInfo* l = file->find("logits");
    if (!t || !l) throw Error(path + ": needs tensors 'tokens' and 'logits'");
    const int64_t n = int64_t(tokens.size());
    if (t->dtype != DType::I32 || t->shape != std::vector<int64_t>{n})
      throw Error(path + ": 'tokens' must be int32 [" + std::to_string(n) + "] to match this evaluation");
    if (std::memcmp(file->data(*t), tokens.data(), size_t(n) * 4) != 0)
      throw Error(path + ": its tokens differ from the evaluated text");
    if (l->dtype != DType::F32 || l->shape != std::vector<int64_t>{n, vocab})
      throw Error(path + ": 'logits' must be fp32 [" + std::to_string(n) + ", " + std::to_string(vocab) + "]");
    logits = reinterpret_cast<const float*>(file->data(*l));
  }
};

int run(const EvalOptions& o) {
  if (!o.save_logits.empty()) {
    refuse_output_overlap(o.save_logits, o.path, "the model");
    refuse_output_overlap(o.save_logits, o.text, "--text");
    refuse_output_overlap(o.save_logits, o.tokens, "--tokens");
    refuse_output_overlap(o.save_logits, o.ref_logits, "--ref-logits");
  }
  LoadedModel m = load_model(o.path, o.threads, o.verify);
  const Model& model = *m.model;
  std::vector<int32_t> tokens;
  if (!o.tokens.empty()) {
    tokens = read_token_list(o.tokens);
  } else {
    Tokenizer tok = Tokenizer::load(locate_tokenizer_files(o.path));
    // A prefix LM's tokenizer closes a text with its [gMASK] <sop> prompt; evaluate_windows gives each window its own.
    tokens = tok.encode(read_file(o.text), !m.model->spec().prefix_lm());
  }
  if (o.max_tokens < 0) throw Error("--max-tokens must not be negative");
  if (o.max_tokens > 0 && int64_t(tokens.size()) > o.max_tokens) tokens.resize(size_t(o.max_tokens));
  const int64_t n = int64_t(tokens.size()), vocab = model.spec().vocab_size;
  if (n < 2) throw Error("the evaluation text has " + std::to_string(n) + " tokens; at least 2 are needed");
  if (o.ctx < 2) throw Error("--ctx must be at least 2");
  KvDType kv = resolve_kv_dtype(*m.workspace, o.kv_cache);

  std::optional<RefLogits> ref;
  if (!o.ref_logits.empty()) ref.emplace(o.ref_logits, tokens, vocab);
  std::unique_ptr<SafetensorsWriter> writer;
  // A hidden sibling named with our PID, renamed into place at the end; what a SIGKILLed run left is swept first.
  std::string tmp_save;
  if (!o.save_logits.empty()) {
    remove_stale_staging(o.save_logits);
    tmp_save = process_sibling(o.save_logits, "kiln-tmp").string();
    writer = std::make_unique<SafetensorsWriter>(
        tmp_save, std::vector<TensorPlan>{{"tokens", DType::I32, {n}}, {"logits", DType::F32, {n, vocab}}});
    writer->write(tokens.data(), size_t(n) * 4);
  }

  PerplexityMeter ppl;
  LogitComparison cmp;
  // No partial --save-logits file is left behind when evaluation fails or is interrupted.
  struct RemoveOnError {
    std::unique_ptr<SafetensorsWriter>& writer;
    const std::string& path;
    ~RemoveOnError() {
      if (!writer) return;
      writer.reset();
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
  } guard{writer, tmp_save};
  evaluate_windows(*m.model, tokens, o.ctx, kv, [&](int64_t begin, std::span<const int32_t> w, const float* logits) {
    if (writer) writer->write(logits, w.size() * size_t(vocab) * 4);
    // Row i predicts w[i + 1]; the last row of a window has no target inside it.
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      const float* row = logits + i * size_t(vocab);
      ppl.add(row, vocab, w[i + 1]);
      if (ref) cmp.add(row, ref->logits + (size_t(begin) + i) * size_t(vocab), vocab, w[i + 1]);
    }
  });
  if (writer) {
    writer->finish();
    writer.reset();
    std::filesystem::rename(tmp_save, o.save_logits);
  }

  nlohmann::ordered_json out{
      {"ppl", ppl.perplexity()}, {"n_tokens", ppl.count()}, {"ctx", o.ctx}, {"kv_cache", kv_dtype_name(kv)}};
  if (ref) {
    LogitComparisonReport r = cmp.report();
    out["kld_mean"] = r.kld_mean;
    out["kld_p99"] = r.kld_p99;
    out["kld_max"] = r.kld_max;
    out["top1_agreement"] = r.top1_agreement;
    out["ref_ppl"] = r.ref_ppl;
    out["ppl_ratio"] = r.ppl_ratio;
  }
  if (o.json) {
    print_json(out.dump());
  } else {
    std::printf("perplexity %.4f over %lld tokens (windows of %lld, KV cache %s)\n", ppl.perplexity(),
                (long long)ppl.count(), (long long)o.ctx, kv_dtype_name(kv).c_str());
    if (ref) {
      LogitComparisonReport r = cmp.report();
      std::printf("vs %s: KLD mean %.6g p99 %.6g max %.6g, top-1 agreement %.4f, PPL ratio %.6f\n",
                  o.ref_logits.c_str(), r.kld_mean, r.kld_p99, r.kld_max, r.top1_agreement, r.ppl_ratio);
    }
  }
  return 0;
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<EvalOptions>();
  sub.add_option("PATH", o->path, "Workspace, or a Hugging Face checkpoint directory (converted in memory)")
      ->required();
  auto* input = sub.add_option_group("input", "Exactly one of --text and --tokens");
  input->add_option("--text", o->text, "Text file, tokenized with the workspace's tokenizer");
  input->add_option("--tokens", o->tokens, "JSON file holding a list of token ids (instead of --text)");
  input->require_option(1);
  sub.add_option("--ctx", o->ctx, "Tokens per window; windows do not overlap")
      ->capture_default_str()
      ->check(int_range(2, kMaxTokens));
  sub.add_option("--save-logits", o->save_logits,
                 "Write a safetensors file with 'tokens' (int32 [n]) and 'logits' (fp32 [n, vocab]); row i is the "
                 "prediction after token i");
  sub.add_option("--ref-logits", o->ref_logits,
                 "Compare with a file written by --save-logits: KL divergence, top-1 agreement, PPL ratio");
  sub.add_option("--max-tokens", o->max_tokens, "Evaluate only the first N tokens of the input (0: all)")
      ->check(int_range(0, kMaxTokens));
  sub.add_option("--kv-cache", o->kv_cache, kKvCacheFlagHelp)->capture_default_str();
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")
      ->check(int_range(0, kMaxThreads));
  sub.add_flag("--verify", o->verify, kVerifyFlagHelp);
  sub.add_flag("--json", o->json, "Print the results as JSON");
  return [o] { return run(*o); };
}

}  // namespace

KILN_COMMAND(60, "eval", "Measure perplexity, and KL divergence against saved logits", setup);

}  // namespace kiln::tools
