#include "quant/quantize.h"

#include <chrono>
#include <cstdio>
#include <vector>

#include "calib/layer_stream.h"
#include "quant/int4.h"
#include "quant/int8_head.h"
#include "quant/quantize_resume.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/progress.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/tokenizer/files.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/workspace.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

namespace {

constexpr const char* kResumeDir = "resume";  // inside the staging directory

void check_options(const QuantizeOptions& o) {
  if (!o.head.empty() && o.head != "int8") throw Error("--head '" + o.head + "' is not supported; use int8");
  if (o.method == "none" && o.head.empty())
    throw Error("--method none quantizes nothing here; add --head int8 (or --kv-cache int8)");
  if (o.method != "rtn" && o.method != "awq" && o.method != "none")
    throw Error("--method '" + o.method + "' is not supported; use rtn, awq or none");
  if (o.method == "awq" && o.awq.data.empty())
    throw Error("--method awq needs calibration data: pass --data FILE (.txt or .jsonl)");
  if (o.method != "awq" && !o.awq.data.empty()) throw Error("--data is only used by --method awq");
  if (o.method != "awq" && !o.awq.dump.empty()) throw Error("--awq-dump is only used by --method awq");
  if (o.bits != 4) throw Error("--w-bits " + std::to_string(o.bits) + " is not supported; only 4-bit weights are");
  if (o.group_size <= 0 || o.group_size % 2)
    throw Error("--group-size " + std::to_string(o.group_size) + " must be a positive even number");
  if (o.max_ppl_increase && o.eval_text.empty())
    throw Error("--max-ppl-increase needs --eval-text (the text the perplexity is measured on)");
  if (o.max_ppl_increase && *o.max_ppl_increase < 0) throw Error("--max-ppl-increase must not be negative");
  if (o.resume && !o.awq.dump.empty()) throw Error("--awq-dump cannot be combined with --resume");
}

// The same document the source has, with the quantization block, weight list and provenance of this step.
ordered_json output_document(const Workspace& src, const WeightQuantization& q, const std::vector<TensorPlan>& plan,
                             uint64_t tensor_bytes, const std::vector<std::string>& weight_files,
                             const QuantizeOptions& opt, const ordered_json& awq) {
  const json& sj = src.info().json;
  ordered_json doc;
  doc["format"] = kWorkspaceFormat;
  doc["format_version"] = spec_format_version(src.spec());
  doc["model"] = spec_to_json(src.spec());
  doc["dtype"] = src.info().dtype;
  ordered_json kv = !opt.kv_cache.empty() ? ordered_json{{"dtype", opt.kv_cache}}
                    : sj.contains("quantization") && sj["quantization"].contains("kv_cache")
                        ? ordered_json::parse(sj["quantization"]["kv_cache"].dump())
                        : ordered_json{{"dtype", "auto"}};
  doc["quantization"] = {{"weights", weight_quantization_to_json(q)}, {"kv_cache", kv}};
  if (q.head.int8()) doc["quantization"]["head"] = head_quantization_to_json(q.head);
  if (!awq.is_null()) doc["quantization"]["weights"]["awq"] = awq;
  doc["weights"] = {{"files", weight_files}, {"tensor_count", plan.size()}, {"tensor_bytes", tensor_bytes}};
  doc["tokenizer"] = sj.contains("tokenizer") ? ordered_json::parse(sj["tokenizer"].dump()) : ordered_json(nullptr);
  size_t size = 0;
  const std::string src_hash = sha256_file((src.info().dir / kWorkspaceFile).string(), &size);
  doc["provenance"] = {{"source", fs::absolute(opt.input).lexically_normal().string()},
                       {"source_files", {{kWorkspaceFile, {{"sha256", src_hash}, {"size", size}}}}},
                       {"source_provenance", sj.contains("provenance") ? ordered_json::parse(sj["provenance"].dump())
                                                                       : ordered_json(nullptr)},
                       {"kiln_version", KILN_VERSION},
                       {"command", opt.command}};
  return doc;
}

bool awq_touches(const std::string& suffix) {
  for (const char* n : {names::kAttnNorm, names::kAttnNormBias, names::kQkv, names::kQkvBias, names::kO,
                        names::kFfnNorm, names::kFfnNormBias, names::kGateUp, names::kGateUpBias, names::kUp,
                        names::kDown, names::kRouter, names::kSharedGate, names::kSharedGateUp, names::kSharedDown})
    if (suffix == n) return true;
  return names::expert_pattern(suffix) != suffix;  // an expert's gate_up or down
}

// Where a tensor's output bytes go: the workspace writer, or a resumable run's layer file.
class TensorSink {
 public:
  virtual ~TensorSink() = default;
  virtual void begin_tensor() = 0;
  virtual void write(const void* bytes, size_t n) = 0;
};
class WriterSink : public TensorSink {
 public:
  explicit WriterSink(WorkspaceWriter& w) : w_(w) {}
  void begin_tensor() override { w_.begin_tensor(); }
  void write(const void* bytes, size_t n) override { w_.write(bytes, n); }

 private:
  WorkspaceWriter& w_;
};
class ResumeSink : public TensorSink {
 public:
  explicit ResumeSink(ResumeState& r) : r_(r) {}
  void begin_tensor() override {}
  void write(const void* bytes, size_t n) override { r_.write(bytes, n); }

 private:
  ResumeState& r_;
};

// A tensor changed by AWQ that stays unquantized (norm weights, biases, or everything with --awq-fold-only) goes back
// to the workspace dtype.
void write_in_dtype(TensorSink& writer, DType dtype, const std::vector<float>& v, const std::string& name) {
  writer.begin_tensor();
  if (dtype == DType::F32) {
    writer.write(v.data(), v.size() * 4);
    return;
  }
  std::vector<uint16_t> half(v.size());
  if (dtype == DType::BF16) {
    convert_f32_to_bf16(v.data(), half.data(), v.size());
  } else if (convert_f32_to_f16(v.data(), half.data(), v.size()) != v.size()) {
    throw Error("tensor '" + name + "' overflows fp16 after folding the AWQ scales; quantize an fp32/bf16 workspace");
  }
  writer.write(half.data(), half.size() * 2);
}

// One layer's entry of quantization.weights.awq.alpha: the chosen α of each group (null where a group is skipped).
ordered_json awq_layer_json(const AwqLayerPlan& l) {
  ordered_json a = {{"attn_norm->qkv", l.s_attn.empty() ? ordered_json(nullptr) : ordered_json(l.a_attn)}};
  a["v->o"] = l.s_vo.empty() ? ordered_json(nullptr) : ordered_json(l.a_vo);
  a["ffn_norm->gate_up"] = l.s_ffn.empty() ? ordered_json(nullptr) : ordered_json(l.a_ffn);
  a["up->down"] = l.s_down.empty() ? ordered_json(nullptr) : ordered_json(l.a_down);  // null: not gated
  if (!l.s_expert_down.empty()) {  // MoE: the token-weighted mean over experts; experts no token reached
    a["up->down"] = l.a_down;
    a["idle_experts"] = l.idle_experts;
  }
  return a;
}

// quantization.weights.awq in kiln.json: where the calibration came from and what the search chose, per layer.
ordered_json awq_document(const AwqPlan& p, const ordered_json& layers, const QuantizeOptions& opt) {
  return {{"data", fs::absolute(opt.awq.data).lexically_normal().string()},
          {"data_sha256", p.data_sha256},
          {"samples", opt.awq.samples},
          {"seqlen", opt.awq.seqlen},
          {"seed", opt.awq.seed},
          {"blocks", p.blocks},
          {"grid", opt.awq.grid},
          {"loss", opt.awq.loss},
          {"loss_blocks", p.loss_blocks},
          {"clip", opt.awq.clip && !opt.awq.fold_only},
          {"clip_grid", opt.awq.clip_grid},
          {"clip_max_shrink", opt.awq.max_shrink},
          {"fold_only", opt.awq.fold_only},
          {"inputs", p.fp_inputs ? "fp" : "quantized"},
          {"alpha", layers}};
}

// Everything a layer's output bytes depend on: the key of a resumable run's saved results (quant/quantize_resume.h).
ordered_json resume_options(const Workspace& src, const QuantizeOptions& opt) {
  const std::string src_hash = sha256_file((src.info().dir / kWorkspaceFile).string());
  ordered_json o = {{"kiln_version", KILN_VERSION},
                    {"input_kiln_json_sha256", src_hash},
                    {"method", opt.method},
                    {"bits", opt.bits},
                    {"group_size", opt.group_size}};
  if (!opt.head.empty()) o["head"] = opt.head;
  if (opt.method != "awq") return o;
  const AwqOptions& a = opt.awq;
  o["data_sha256"] = sha256_file(a.data.string());
  o["field"] = a.field;
  o["samples"] = a.samples;
  o["seqlen"] = a.seqlen;
  o["seed"] = a.seed;
  o["batch_tokens"] = a.batch_tokens;
  o["grid"] = a.grid;
  o["clip_grid"] = a.clip_grid;
  o["max_shrink"] = a.max_shrink;
  o["clip"] = a.clip;
  o["fold_only"] = a.fold_only;
  o["loss"] = a.loss;
  o["loss_samples"] = a.loss_samples;
  o["inputs"] = a.fp_inputs ? "fp" : "quantized";
  return o;
}

}  // namespace

QuantizeResult quantize_workspace(const QuantizeOptions& opt) {
  check_options(opt);
  refuse_output_overlap(opt.output, opt.input, "the input workspace");
  refuse_output_overlap(opt.output, opt.awq.data, "--data");
  refuse_output_overlap(opt.output, opt.eval_text, "--eval-text");
  refuse_output_overlap(opt.awq.dump, opt.input, "the input workspace");
  // Refuses an existing output before any work. With --resume, an interrupted run's staging directory is taken over.
  std::function<bool(const fs::path&)> adoptable;
  if (opt.resume) adoptable = [](const fs::path& dir) { return fs::is_regular_file(dir / kResumeDir / "state.json"); };
  StagingDir staging(opt.output, opt.force, adoptable);
  Workspace src(opt.input);
  const std::string src_label = (opt.input / kWorkspaceFile).string();
  const WeightQuantization existing = weight_quantization_from_json(src.info().json, src_label);
  if (existing.quantized())
    throw Error(opt.input.string() + " is already quantized (quantization.weights.method = " + existing.method +
                "); quantize the unquantized workspace instead");
  if (existing.head.int8())
    throw Error(opt.input.string() +
                " already has an int8 head (quantization.head); quantize the unquantized "
                "workspace instead");

  const bool awq = opt.method == "awq";
  WeightQuantization q;
  if (opt.method != "none") {
    q.method = opt.method;
    q.bits = opt.bits;
    q.group_size = opt.group_size;
    q.zero_point = true;
    q.modules = default_quantized_modules(src.spec());
  }
  // --awq-fold-only: the smoothing scales folded in, weights left unquantized (an exactness check of the folding).
  const bool fold_only = awq && opt.awq.fold_only;
  if (fold_only) q = WeightQuantization{};
  if (opt.head == "int8") q.head = {"int8", kInt8HeadGroup};
  // The tensor the int8 head is quantized from: lm_head, or the tied embedding (which itself stays as it is).
  const std::string head_source = src.spec().tie_word_embeddings ? names::kEmbedding : names::kLmHead;
  const DType dtype = workspace_dtype(src.info().dtype, src_label);

  // Plan every output tensor (and check every shape) before writing a byte.
  std::vector<CanonicalTensor> source_list = canonical_tensors(src.spec());
  std::vector<TensorPlan> plan;
  uint64_t out_bytes = 0, in_bytes = 0;
  for (const CanonicalTensor& c : source_list) {
    const Workspace::Tensor& t = src.get(c.name);
    if (t.info->shape != c.shape || t.info->dtype != dtype)
      throw Error(src_label + ": tensor '" + c.name + "' does not match the model spec; run 'kiln verify'");
    in_bytes += t.info->nbytes();
    if (q.covers(c.suffix)) check_int4_shape(c.shape[0], c.shape[1], q.group_size, c.name);
    if (q.head.int8() && c.name == head_source) check_int8_head_shape(c.shape[0], c.shape[1], c.name);
  }
  for (const CanonicalTensor& c : canonical_tensors(src.spec(), q)) {
    plan.push_back({c.name, c.dtype ? *c.dtype : dtype, c.shape});
    out_bytes += plan.back().nbytes();
  }

  // Disk space for the output (and, checked by the planner, for spilled activations) before any weight is read. With
  // --resume the layers' results are kept as files until the output is complete: about twice the output.
  calib::require_free_space(staging.path(), opt.resume ? 2 * out_bytes : out_bytes, "the quantized workspace");
  if (!opt.eval_text.empty()) require_regular_file(opt.eval_text);
  if (awq || !opt.eval_text.empty()) Tokenizer::load(locate_tokenizer_files(opt.input));  // fails here, not at the end

  const int64_t num_layers = src.spec().num_layers;
  std::unique_ptr<ResumeState> resume;
  if (opt.resume) {
    // What the interrupted run left besides its results (partial shards, a spill file) is rewritten from scratch.
    std::vector<fs::path> stale;
    for (const auto& e : fs::directory_iterator(staging.path()))
      if (e.path().filename() != kResumeDir) stale.push_back(e.path());
    for (const fs::path& p : stale) fs::remove_all(p);
    try {
      resume = std::make_unique<ResumeState>(staging.path() / kResumeDir, resume_options(src, opt), awq,
                                             opt.output.string());
    } catch (const Error&) {
      if (!staging.adopted_from().empty()) staging.keep();  // refused, not discarded: the right options can resume
      throw;
    }
    if (resume->layers_done() > 0)
      std::fprintf(stderr, "kiln quantize: resuming %s at layer %lld of %lld from an interrupted run's results\n",
                   opt.output.c_str(), static_cast<long long>(resume->layers_done()),
                   static_cast<long long>(num_layers));
    else
      std::fprintf(stderr, "kiln quantize: no finished layers to resume for %s; starting at layer 0\n",
                   opt.output.c_str());
  }

  QuantizeResult result;
  ordered_json awq_json;
  std::unique_ptr<AwqPlanner> planner;
  WorkspaceWriter writer(staging.path(), plan, opt.max_shard_bytes);
  try {
    // AWQ searches layer by layer while the output is written: a layer's tensors are transformed with its plan as
    // soon as it has been searched, so only one layer's weights are ever widened at a time.
    if (awq) {
      planner = std::make_unique<AwqPlanner>(src, opt.awq, opt.group_size, opt.threads, opt.progress,
                                             staging.path() / ".awq-activations");
      if (resume && resume->layers_done() > 0) {
        std::vector<std::pair<double, double>> seconds;
        for (int64_t l = 0; l < resume->layers_done(); ++l)
          seconds.emplace_back(resume->record(l).value("seconds", 0.0), resume->record(l).value("cpu_seconds", 0.0));
        planner->skip_finished(resume->layers_done(), resume->stream_file(), seconds);
      }
    }
    if (resume) result.resumed_layers = resume->layers_done();
    auto produced = [&](const CanonicalTensor& c) {
      return q.covers(c.suffix) || (awq && c.layer >= 0 && awq_touches(c.suffix)) ||
             (q.head.int8() && c.name == names::kLmHead);
    };
    // The int8 head's two tensors (qweight, scales) from the fp32 head.
    auto write_int8_head = [&](const std::vector<float>& head, const CanonicalTensor& c, TensorSink& sink) {
      Int8HeadMatrix m = quantize_int8_head(head.data(), c.shape[0], c.shape[1], c.name);
      sink.begin_tensor();
      sink.write(m.qweight.data(), m.qweight.size());
      sink.begin_tensor();
      sink.write(m.scales.data(), m.scales.size() * 2);  // fp16 bits, little-endian
    };
    // A tensor that is not copied verbatim: transformed (AWQ) and quantized (int4) or rounded back to its dtype.
    // The widened copy is the tensor's own (freed when it is written), and the layer is searched before it is made:
    // neither the largest tensor's copy nor this one is held through the next layer's search.
    auto produce = [&](const CanonicalTensor& c, TensorSink& sink) {
      const Workspace::Tensor& t = src.get(c.name);
      const AwqLayerPlan* layer_plan = awq && c.layer >= 0 ? &planner->layer(c.layer) : nullptr;
      std::vector<float> wide(static_cast<size_t>(t.info->numel()));
      convert_to_f32(dtype, t.data(), wide.data(), wide.size());
      const int64_t cols = c.shape.size() > 1 ? c.shape[1] : 1;
      if (layer_plan)  // AWQ changes layer tensors only; an int8 head is quantized from the source as is
        awq_transform(src.spec(), *layer_plan, c.suffix, wide.data(), c.shape[0], cols, opt.group_size);
      if (q.head.int8() && c.name == names::kLmHead) {
        write_int8_head(wide, c, sink);
      } else if (!q.covers(c.suffix)) {
        write_in_dtype(sink, dtype, wide, c.name);
      } else {
        Int4Matrix m = quantize_int4(wide.data(), c.shape[0], c.shape[1], q.group_size, c.name);
        sink.begin_tensor();
        sink.write(m.qweight.data(), m.qweight.size());
        sink.begin_tensor();
        sink.write(m.scales.data(), m.scales.size() * 2);  // fp16 bits, little-endian on every supported host
        sink.begin_tensor();
        sink.write(m.zeros.data(), m.zeros.size());
      }
      t.file->file().dont_need(t.file->data_start() + t.info->begin, t.info->nbytes());
    };
    // --resume: layer l's produced tensors go to its own file first, which is then recorded as finished.
    auto finish_layer = [&](int64_t l) {
      const auto t0 = std::chrono::steady_clock::now();
      const double c0 = calib::process_cpu_seconds();
      resume->begin_layer();
      ResumeSink sink(*resume);
      for (const CanonicalTensor& c : source_list) {
        if (c.layer != l || !produced(c)) continue;
        check_interrupt();
        produce(c, sink);
      }
      ordered_json record = {{"layer", l}};
      std::function<std::string(const fs::path&)> save;
      if (planner) {
        record["awq"] = awq_layer_json(planner->layer(l));
        record["seconds"] = planner->so_far().layer_seconds[size_t(l)].first;
        record["cpu_seconds"] = planner->so_far().layer_seconds[size_t(l)].second;
        if (l + 1 < num_layers) save = [&](const fs::path& f) { return planner->save_stream(f); };
      } else {
        record["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        record["cpu_seconds"] = calib::process_cpu_seconds() - c0;
      }
      resume->end_layer(record, save);
      test_signal_after_layer(l);
    };

    // AWQ shows its per-layer progress instead.
    Progress progress("quantizing", in_bytes, awq ? ProgressStyle::none : opt.progress);
    WriterSink direct(writer);
    size_t pi = 0;  // the plan entry of the next begin_tensor
    int64_t current = -1;
    uint64_t layer_off = 0;
    for (const CanonicalTensor& c : source_list) {
      check_interrupt();
      const Workspace::Tensor& t = src.get(c.name);
      const uint64_t n = t.info->nbytes();
      const MappedFile& file = t.file->file();
      const uint64_t off = t.file->data_start() + t.info->begin;
      const size_t parts = q.covers(c.suffix) ? 3 : q.head.int8() && c.name == names::kLmHead ? 2 : 1;
      if (!produced(c)) {
        writer.begin_tensor();
        writer.copy_range(file, off, size_t(n), [&file, off, n] { file.dont_need(off, n); });  // bit-exact
      } else if (!resume || c.layer < 0) {
        produce(c, direct);
      } else {
        if (c.layer != current) {
          current = c.layer;
          while (resume->layers_done() <= current) finish_layer(resume->layers_done());
          layer_off = 0;
        }
        const MappedFile& saved = resume->layer_file(current);
        for (size_t k = 0; k < parts; ++k) {
          const uint64_t bytes = plan[pi + k].nbytes();
          if (layer_off + bytes > saved.size())
            throw Error(saved.path() + ": shorter than the layer's tensors; rerun without --resume");
          writer.begin_tensor();
          writer.copy_range(saved, layer_off, size_t(bytes),
                            [&saved, layer_off, bytes] { saved.dont_need(layer_off, bytes); });
          layer_off += bytes;
        }
      }
      if (q.covers(c.suffix)) result.tensors_quantized++;
      pi += parts;
      progress.advance(n);
    }
    if (q.head.int8() && src.spec().tie_word_embeddings) {
      // The tied table was copied as the embedding; its int8 copy, used only as the head, comes last.
      const CanonicalTensor& table = source_list.front();
      const Workspace::Tensor& t = src.get(table.name);
      std::vector<float> wide(static_cast<size_t>(t.info->numel()));
      convert_to_f32(dtype, t.data(), wide.data(), wide.size());
      write_int8_head(wide, table, direct);
      pi += 2;
    }
    progress.finish();
    if (planner) {
      const AwqPlan& done = planner->finish();
      ordered_json layers = ordered_json::array();
      for (int64_t l = 0; l < num_layers; ++l)
        layers.push_back(l < result.resumed_layers ? ordered_json::parse(resume->record(l).at("awq").dump())
                                                   : awq_layer_json(done.layers[size_t(l)]));
      awq_json = awq_document(done, layers, opt);
      result.awq_layer_seconds = done.layer_seconds;
      result.awq_spilled = done.spilled;
      planner.reset();  // frees the stream and removes its spill file before the staging directory is committed
    }
  } catch (...) {
    planner.reset();
    if (resume && resume->layers_done() > 0) {
      staging.keep();
      std::fprintf(stderr,
                   "kiln quantize: %lld of %lld layers are finished and kept in %s; the same command with --resume "
                   "continues from there\n",
                   static_cast<long long>(resume->layers_done()), static_cast<long long>(num_layers),
                   staging.path().c_str());
    }
    throw;
  }

  // Every non-weight file of the source (tokenizer files, chat template, generation config) is copied verbatim.
  std::vector<std::string> weight_files(src.info().weight_files);
  for (const auto& [name, entry] : src.info().manifest) {
    if (std::find(weight_files.begin(), weight_files.end(), name) != weight_files.end()) continue;
    writer.copy_file(src.info().dir / name, name);
  }
  result.kiln_json = writer.finish(output_document(src, q, plan, out_bytes, writer.weight_files(), opt, awq_json));
  if (resume) {
    resume.reset();
    fs::remove_all(staging.path() / kResumeDir);  // the layers' results are in the shards now
  }
  result.input_bytes = in_bytes;
  result.output_bytes = out_bytes;
  check_interrupt();

  if (!opt.eval_text.empty()) {
    result.quality =
        compare_workspaces(staging.path(), opt.input, opt.eval_text, opt.eval_ctx, opt.eval_max_tokens, opt.threads);
    if (opt.max_ppl_increase && !(result.quality->ppl_increase <= *opt.max_ppl_increase)) {
      result.gate_failed = true;
      return result;  // the staging directory is removed: a model that fails the gate is not published
    }
  }
  staging.commit();
  return result;
}

}  // namespace kiln
