// kiln calibrate WS --data F [--field text] [--samples 128] [--seqlen 512] [--seed S] [-o STATS] [--json]
// Runs sampled token blocks of a dataset through the workspace's model and records activation statistics
// (docs/calibration.md). The stats file and its JSON report appear atomically or not at all.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "calib/calibrate.h"
#include "calib/dataset.h"
#include "runtime/core/error.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/io/path_safety.h"
#include "runtime/io/progress.h"
#include "runtime/io/sha256.h"
#include "runtime/io/staging_dir.h"
#include "runtime/text/tokenizer/files.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "runtime/workspace/verify.h"
#include "runtime/workspace/workspace.h"
#include "tools/command.h"
#include "tools/flag_checks.h"

namespace kiln::tools {
namespace {

namespace fs = std::filesystem;

struct CalibrateOptions {
  std::string workspace, data, field = "text", output, max_memory;
  int64_t samples = 128, seqlen = 512, batch_tokens = 4096;
  uint64_t seed = 0;
  unsigned threads = 0;
  bool verify = false;
  bool json = false, force = false;
};

// Beside the workspace, never inside it: the workspace manifest covers every file in its directory.
fs::path default_output(const std::string& ws) {
  fs::path p = fs::path(ws).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.parent_path() / (p.filename().string() + ".calib.safetensors");
}

fs::path report_path(const fs::path& stats) {
  if (stats.extension() == ".safetensors") return fs::path(stats).replace_extension(".json");
  return fs::path(stats.string() + ".json");
}

// A hidden sibling that is renamed over the destination once complete; removed if anything fails first.
struct TempFile {
  fs::path path;
  explicit TempFile(const fs::path& dest) : path(process_sibling(dest, "kiln-tmp")) {}
  ~TempFile() {
    std::error_code ec;
    if (!path.empty()) fs::remove(path, ec);
  }
  void commit(const fs::path& dest) {
    std::error_code ec;
    fs::rename(path, dest, ec);
    if (ec) throw Error(dest.string() + ": cannot move the output into place: " + ec.message());
    path.clear();
  }
};

int64_t peak_rss_bytes() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_maxrss) * 1024;  // Linux reports kilobytes
}

int run(const CalibrateOptions& o) {
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path stats_path = o.output.empty() ? default_output(o.workspace) : fs::path(o.output);
  const fs::path report = report_path(stats_path);
  const fs::path out_dir = stats_path.parent_path().empty() ? fs::path(".") : stats_path.parent_path();
  std::error_code ec;
  if (!fs::is_directory(out_dir, ec)) throw Error(out_dir.string() + ": output directory does not exist");
  for (const fs::path& p : {stats_path, report}) {
    refuse_output_overlap(p, o.workspace, "the workspace");
    refuse_output_overlap(p, o.data, "--data");
    remove_stale_staging(p);
  }
  for (const fs::path& p : {stats_path, report})
    if (fs::exists(p, ec) && !o.force) throw Error(p.string() + ": output already exists (use --force to replace it)");
  if (o.samples < 1) throw Error("--samples must be at least 1");
  if (o.seqlen < 1) throw Error("--seqlen must be at least 1");

  // Everything that can be wrong with the inputs is checked before a weight is read: the data, the tokenizer, the
  // workspace's tensor list (opening only maps the shards) and the disk space for a spilled residual stream.
  std::vector<std::string> docs = calib::load_documents(o.data, o.field);
  if (o.verify && is_workspace(o.workspace)) {
    VerifyReport r = verify_workspace(o.workspace, /*progress=*/false);
    if (!r.ok()) throw Error(o.workspace + ": --verify: " + r.problems[0]);
  }
  Tokenizer tok = Tokenizer::load(locate_tokenizer_files(o.workspace));
  std::unique_ptr<Workspace> ws = open_workspace(o.workspace);
  const ModelSpec& spec = ws->spec();
  std::optional<int32_t> eos;
  if (!spec.eos_token_ids.empty())
    eos = int32_t(spec.eos_token_ids[0]);
  else
    eos = tok.eos_id();
  std::vector<int32_t> stream = calib::token_stream(tok, docs, eos);
  docs.clear();
  if (stream.empty()) throw Error(o.data + ": the dataset is empty (no tokens)");
  for (int32_t id : stream)
    if (id < 0 || id >= spec.vocab_size)
      throw Error(o.data + ": token id " + std::to_string(id) + " is outside the model's vocabulary of " +
                  std::to_string(spec.vocab_size));
  calib::Blocks blocks = calib::sample_blocks(stream, o.samples, o.seqlen, o.seed, o.data);
  if (blocks.count() < o.samples)
    std::fprintf(stderr,
                 "kiln calibrate: warning: %s holds %lld tokens, room for only %lld of the %lld requested "
                 "blocks of %lld; using %lld\n",
                 o.data.c_str(), (long long)stream.size(), (long long)blocks.count(), (long long)o.samples,
                 (long long)o.seqlen, (long long)blocks.count());
  calib::LayerStreamOptions lo;
  lo.batch_tokens = o.batch_tokens;
  lo.max_memory = o.max_memory.empty() ? calib::default_max_memory() : calib::parse_memory_size(o.max_memory);
  lo.spill_path = process_sibling(stats_path, "kiln-spill");
  const uint64_t stream_bytes =
      uint64_t(blocks.count() * calib::calibration_length(spec, blocks.seqlen) * spec.hidden_size) * sizeof(float);
  calib::require_free_space(out_dir, (stream_bytes > lo.max_memory ? stream_bytes : 0) + (uint64_t(1) << 20),
                            "the statistics and the spilled activations");

  std::unique_ptr<Backend> backend = make_backend("", o.threads);
  Progress progress("calibrate", uint64_t(spec.num_layers), o.json ? ProgressStyle::json_lines : ProgressStyle::bar,
                    "layers");
  int64_t shown = 0;
  nlohmann::ordered_json layer_times = nlohmann::ordered_json::array();
  auto lt = std::chrono::steady_clock::now();
  double lc = calib::process_cpu_seconds();
  calib::StatsObserver stats = calib::run_calibration(*ws, *backend, blocks, lo, [&](int64_t done) {
    progress.advance(uint64_t(done - shown));
    shown = done;
    const auto now = std::chrono::steady_clock::now();
    const double c = calib::process_cpu_seconds();
    layer_times.push_back(
        {{"layer", done - 1}, {"seconds", std::chrono::duration<double>(now - lt).count()}, {"cpu_seconds", c - lc}});
    lt = now;
    lc = c;
  });
  progress.finish();
  // Experts of a mixture-of-experts model that no calibration token was routed to: their statistics are empty.
  std::vector<std::string> idle_experts;
  for (const auto& [name, c] : stats.linears()) {
    const std::string gate_up = ".gate_up";
    if (c.rows > 0 || name.find(".ffn.experts.") == std::string::npos ||
        name.compare(name.size() - std::min(name.size(), gate_up.size()), gate_up.size(), gate_up))
      continue;
    idle_experts.push_back(name.substr(0, name.size() - gate_up.size()));
    std::fprintf(stderr, "kiln calibrate: note: %s received no calibration tokens; its statistics are empty\n",
                 idle_experts.back().c_str());
  }

  const std::string data_sha = sha256_file(o.data);
  // Only inputs go into the stats file's header (no paths, times or sizes of this machine), so it is reproducible.
  const std::map<std::string, std::string> meta{{"format", "kiln-calib"},
                                                {"version", "1"},
                                                {"samples", std::to_string(blocks.count())},
                                                {"seqlen", std::to_string(o.seqlen)},
                                                {"seed", std::to_string(o.seed)},
                                                {"field", o.field},
                                                {"data_sha256", data_sha}};
  TempFile tmp_stats(stats_path), tmp_report(report);
  SafetensorsWriter::Result written = calib::write_stats(tmp_stats.path, stats, blocks, meta);

  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::ordered_json out{{"stats", stats_path.string()},
                             {"stats_sha256", written.sha256},
                             {"report", report.string()},
                             {"workspace", o.workspace},
                             {"data", o.data},
                             {"data_sha256", data_sha},
                             {"field", o.field},
                             {"samples", blocks.count()},
                             {"samples_requested", o.samples},
                             {"seqlen", o.seqlen},
                             {"tokens", blocks.count() * o.seqlen},
                             {"dataset_tokens", int64_t(stream.size())},
                             {"seed", o.seed},
                             {"block_starts", blocks.starts},
                             {"idle_experts", idle_experts},
                             {"peak_rss_bytes", peak_rss_bytes()},
                             {"seconds", seconds},
                             {"spilled", stream_bytes > lo.max_memory},
                             {"layers", layer_times}};
  write_text_file(tmp_report.path, out.dump(2) + "\n");
  tmp_stats.commit(stats_path);
  tmp_report.commit(report);
  if (o.json) {
    print_json(out.dump());
  } else {
    std::printf("calibrated %lld blocks of %lld tokens in %.1f s (peak RSS %.1f MiB)\nstats: %s\nreport: %s\n",
                (long long)blocks.count(), (long long)o.seqlen, seconds, double(peak_rss_bytes()) / (1 << 20),
                stats_path.c_str(), report.c_str());
  }
  return 0;
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<CalibrateOptions>();
  sub.add_option("WS", o->workspace, "Workspace")->required();
  sub.add_option("--data", o->data, "Calibration text: a .txt file (one document) or .jsonl (one object per line)")
      ->required();
  sub.add_option("--field", o->field, "The text field of each .jsonl object")->capture_default_str();
  sub.add_option("--samples", o->samples, "Blocks to draw")->capture_default_str()->check(int_range(1, 1 << 20));
  sub.add_option("--seqlen", o->seqlen, "Tokens per block")->capture_default_str()->check(int_range(1, 1 << 20));
  sub.add_option("--seed", o->seed, "Seed of the block sampling")->capture_default_str();
  sub.add_option("-o,--output", o->output,
                 "Stats file (default: WS.calib.safetensors beside the workspace); the report goes to its .json "
                 "sibling");
  sub.add_option("--batch-tokens", o->batch_tokens, "Tokens per forward batch (whole blocks; bounds activations)")
      ->capture_default_str()
      ->check(int_range(1, kMaxTokens));
  sub.add_option("--max-memory", o->max_memory,
                 "Residual-stream bytes kept in memory between layers (e.g. 512M, 8G); beyond that it is spilled to "
                 "a temporary file beside the output (default: a quarter of RAM)");
  sub.add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")
      ->check(int_range(0, kMaxThreads));
  sub.add_flag("--verify", o->verify, kVerifyFlagHelp);
  sub.add_flag("--force", o->force, "Replace existing output");
  sub.add_flag("--json", o->json,
               "Print the report as JSON on stdout, and one JSON line per finished layer on stderr (instead of "
               "the progress bar)");
  return [o] { return run(*o); };
}

}  // namespace

KILN_COMMAND(70, "calibrate", "Collect activation statistics for quantization", setup);

}  // namespace kiln::tools
