// kiln bench offline PATH | kiln bench serve --url URL: throughput and latency of the scheduler in process, or of
// an OpenAI-compatible server under load, swept over concurrencies (or Poisson rates). Thin: options, set-up, output;
// the measuring is runtime/bench.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "runtime/bench/bench_stats.h"
#include "runtime/bench/offline_bench.h"
#include "runtime/bench/workload.h"
#include "runtime/core/error.h"
#include "runtime/engine/loaded_model.h"
#include "runtime/serve/async_scheduler.h"
#include "runtime/text/tokenizer/tokenizer.h"
#include "tools/command.h"
#include "tools/flag_checks.h"
#include "tools/generation_cli.h"
#ifdef KILN_HAVE_HTTPLIB
#include "runtime/bench/http_load.h"
#endif

namespace kiln::tools {
namespace {

struct BenchCliOptions {
  // workload
  int64_t num_prompts = 64, input_len = 128, output_len = 128, id_range = 1000;
  uint64_t seed = 0;
  std::string prompts_file, concurrency = "8", rate, csv;
  bool json = false;
  // offline: the scheduler, with kiln serve's defaults so the two compare at equal settings
  std::string path, kv_cache = "auto";
  int64_t max_batch_tokens = 512, max_running = 64, kv_cache_mib = 1024, ctx = 0;
  unsigned threads = 0;
  // serve
  std::string url = "http://127.0.0.1:8000", api_key, model;
  double timeout = 600;
};

std::vector<double> parse_list(const std::string& flag, const std::string& text, bool integers) {
  std::vector<double> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || !(v > 0) || (integers && v != double(int64_t(v))))
      throw Error("" + flag + " takes a comma-separated list of positive " + (integers ? "integers" : "numbers") +
                  " (got '" + text.substr(0, 100) + "')");
    out.push_back(v);
  }
  if (out.empty()) throw Error("" + flag + " is empty");
  return out;
}

void check_workload(const BenchCliOptions& o) {
  if (o.num_prompts < 1) throw Error("--num-prompts must be at least 1");
  if (o.output_len < 1) throw Error("--output-len must be at least 1");
  if (o.prompts_file.empty() && o.input_len < 1) throw Error("--input-len must be at least 1");
  if (o.id_range < 1) throw Error("--id-range must be at least 1");
}

std::vector<bench::BenchPrompt> make_prompts(const BenchCliOptions& o, const Tokenizer* tok) {
  if (!o.prompts_file.empty()) return bench::file_prompts(o.prompts_file, o.num_prompts, tok);
  return bench::synthetic_prompts(o.num_prompts, o.input_len, o.id_range, o.seed);
}

// Prints the runs (table, or JSON with --json) and writes --csv; the CSV goes through a temporary file so that a
// failed run leaves no half-written one.
void report(const BenchCliOptions& o, const std::string& mode, const std::string& target,
            const std::vector<bench::RunSummary>& runs) {
  if (!o.csv.empty()) {
    const std::string tmp = o.csv + ".tmp";
    {
      std::ofstream out(tmp);
      if (!out) throw Error("cannot write " + o.csv);
      out << bench::csv_header() << "\n";
      for (const auto& r : runs) out << bench::csv_row(r) << "\n";
      if (!out.flush()) throw Error("cannot write " + o.csv);
    }
    std::filesystem::rename(tmp, o.csv);
  }
  if (o.json) {
    nlohmann::ordered_json j{{"mode", mode},
                             {"target", target},
                             {"num_prompts", o.num_prompts},
                             {"input_len", o.prompts_file.empty() ? nlohmann::ordered_json(o.input_len) : nullptr},
                             {"output_len", o.output_len},
                             {"prompts_file", o.prompts_file},
                             {"runs", nlohmann::ordered_json::array()}};
    for (const auto& r : runs) j["runs"].push_back(bench::to_json(r));
    print_json(j.dump(2));
    return;
  }
  std::printf("%s", bench::table(runs).c_str());
  // The batched-vs-one-by-one ratio users compare (e.g. against a transformers pipeline run one prompt at a time):
  // each closed-loop run's output tokens/s over the c=1 run's.
  const bench::RunSummary* one = nullptr;
  for (const auto& r : runs)
    if (r.rate == 0 && r.concurrency == 1) one = &r;
  if (one && one->output_tokens_per_s > 0 && runs.size() > 1) {
    std::string line = "batched vs one-by-one (output tokens/s over c=1):";
    for (const auto& r : runs)
      if (r.rate == 0 && r.concurrency > 1) {
        char buf[64];
        std::snprintf(buf, sizeof buf, " c=%lld %.2fx", (long long)r.concurrency,
                      r.output_tokens_per_s / one->output_tokens_per_s);
        line += buf;
      }
    std::printf("%s\n", line.c_str());
  }
  for (const auto& r : runs)
    if (r.failed)
      std::fprintf(stderr, "bench: %lld requests failed; first: %s\n", (long long)r.failed, r.first_error.c_str());
}

int run_offline(const BenchCliOptions& o) {
  check_workload(o);
  const std::vector<double> levels = parse_list("--concurrency", o.concurrency, true);
  LoadedModel m = load_model(o.path, o.threads);
  const ModelSpec& spec = m.model->spec();
  if (o.prompts_file.empty() && o.id_range > spec.vocab_size)
    throw Error("--id-range " + std::to_string(o.id_range) + " exceeds the vocabulary (" +
                std::to_string(spec.vocab_size) + ")");
  Tokenizer tok = Tokenizer::load(locate_tokenizer_files(o.path));
  std::vector<bench::BenchPrompt> prompts = make_prompts(o, &tok);
  // A prefix LM (ChatGLM-6B) runs only prompts that end its context with [gMASK] <sop>: synthetic ones get them as
  // their last two tokens.
  if (spec.prefix_lm() && o.prompts_file.empty())
    for (bench::BenchPrompt& p : prompts) {
      if (p.tokens.size() < 2) throw Error("--input-len must be at least 2 for a prefix LM ([gMASK] <sop>)");
      p.tokens[p.tokens.size() - 2] = int32_t(spec.prefix_lm_gmask_id);
      p.tokens.back() = int32_t(spec.prefix_lm_sop_id);
    }

  // The scheduler as kiln serve builds it (tools/cmd_serve.cpp), so that offline and served runs compare.
  const int64_t context = o.ctx > 0 ? o.ctx : spec.max_position_embeddings;
  const KvDType kv = resolve_kv_dtype(*m.workspace, o.kv_cache);
  const int64_t block = 16;
  KvCacheConfig probe = m.model->kv_config(block, kv, block);
  const int64_t blocks = std::max<int64_t>((context + block - 1) / block,
                                           int64_t((o.kv_cache_mib << 20) / (KvCache::bytes_per_token(probe) * block)));
  KvCache cache(m.model->backend(), m.model->kv_config(blocks * block, kv, block));
  serve::Metrics metrics;
  SchedulerOptions so;
  so.context = context;
  so.max_batch_tokens = o.max_batch_tokens;
  so.max_running = o.max_running;
  so.max_queue = std::max<int64_t>(256, o.num_prompts);
  so.eos_ids = eos_ids(spec.eos_token_ids);
  so.tokenizer = &tok;
  serve::AsyncScheduler scheduler(*m.model, cache, so, metrics);

  double warm = 0;  // one request first, so that no run pays for first-touch costs
  bench::run_offline(scheduler, {prompts.front()}, std::min<int64_t>(o.output_len, 8), 1, &warm);
  std::vector<bench::RunSummary> runs;
  for (double c : levels) {
    double duration = 0;
    const double cpu0 = bench::process_cpu_seconds();
    auto records = bench::run_offline(scheduler, prompts, o.output_len, int64_t(c), &duration);
    runs.push_back(bench::summarize("offline", int64_t(c), 0, duration, records));
    runs.back().process_cpu_s = bench::process_cpu_seconds() - cpu0;
  }
  report(o, "offline", o.path, runs);
  return 0;
}

int run_serve(const BenchCliOptions& o) {
#ifndef KILN_HAVE_HTTPLIB
  (void)o;
  throw Error("kiln bench serve: this build has no HTTP client (cpp-httplib was not found at build time)");
#else
  check_workload(o);
  const bool open_loop = !o.rate.empty();
  const std::vector<double> levels =
      open_loop ? parse_list("--rate", o.rate, false) : parse_list("--concurrency", o.concurrency, true);
  bench::HttpTarget target{o.url, o.api_key, o.model, o.timeout};
  bench::probe(target);
  const std::vector<bench::BenchPrompt> prompts = make_prompts(o, nullptr);
  double warm = 0;
  bench::run_http(target, {prompts.front()}, std::min<int64_t>(o.output_len, 8), 1, 0, o.seed, &warm);
  std::vector<bench::RunSummary> runs;
  for (double level : levels) {
    double duration = 0;
    const int64_t c = open_loop ? 0 : int64_t(level);
    const double rate = open_loop ? level : 0;
    const double cpu0 = bench::process_cpu_seconds();
    auto records = bench::run_http(target, prompts, o.output_len, c, rate, o.seed, &duration);
    runs.push_back(bench::summarize("serve", c, rate, duration, records));
    runs.back().process_cpu_s = bench::process_cpu_seconds() - cpu0;
  }
  report(o, "serve", o.url, runs);
  return 0;
#endif
}

// Numeric flags are range-checked at parse time: a bad value is a usage error (exit 2) before anything runs.
const CLI::Range kCount(int64_t(1), int64_t(1) << 40);

CLI::Validator positive_list(bool integers) {
  return CLI::Validator(
      [integers](std::string& v) -> std::string {
        try {
          parse_list("the value", v, integers);
        } catch (const Error& e) {
          return e.what();
        }
        return {};
      },
      integers ? "positive integers, comma-separated" : "positive numbers, comma-separated");
}

void workload_flags(CLI::App& app, BenchCliOptions& o) {
  app.add_option("--num-prompts,-n", o.num_prompts, "Requests per run")->check(kCount)->capture_default_str();
  app.add_option("--input-len", o.input_len, "Tokens per synthetic prompt")->check(kCount)->capture_default_str();
  app.add_option("--output-len", o.output_len, "Tokens each request generates (greedy, EOS ignored)")
      ->check(kCount)
      ->capture_default_str();
  app.add_option("--prompts", o.prompts_file,
                 "File of prompts, one per line (\\n for a newline), cycled; default: synthetic prompts");
  app.add_option("--id-range", o.id_range, "Synthetic prompts draw token ids from [0, N)")
      ->check(CLI::Range(int64_t(1), int64_t(INT32_MAX)))
      ->capture_default_str();
  app.add_option("--seed", o.seed, "Seed of the synthetic prompts and of the Poisson arrivals")->capture_default_str();
  app.add_option("--concurrency,-c", o.concurrency, "Requests in flight, or a sweep: 1,8,32,64")
      ->check(positive_list(true))
      ->capture_default_str();
  app.add_flag("--json", o.json, "Print the results as JSON");
  app.add_option("--csv", o.csv, "Also write the results to this CSV file, one row per run");
}

Action setup(CLI::App& sub) {
  auto o = std::make_shared<BenchCliOptions>();
  sub.require_subcommand(1);
  sub.footer(
      "Each run sends --num-prompts requests and reports requests/s, output tokens/s, and mean/p50/p99 of TTFT (time "
      "to first token), TPOT (time per output token after the first), ITL (gap between token arrivals) and "
      "end-to-end latency. Concurrency 1 is the sequential baseline.");
  CLI::App* off = sub.add_subcommand("offline", "The scheduler kiln serve runs, in process (no HTTP)");
  off->add_option("PATH", o->path, "Workspace, or a Hugging Face checkpoint directory")->required();
  workload_flags(*off, *o);
  off->add_option("--max-batch-tokens", o->max_batch_tokens, "Most tokens per forward pass")
      ->check(kCount)
      ->capture_default_str();
  off->add_option("--max-running", o->max_running, "Most requests in the running batch")
      ->check(kCount)
      ->capture_default_str();
  off->add_option("--kv-cache-mib", o->kv_cache_mib, "KV cache memory budget in MiB")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30))
      ->capture_default_str();
  off->add_option("--kv-cache", o->kv_cache, kKvCacheFlagHelp)->capture_default_str();
  off->add_option("--ctx", o->ctx, "Context length per request (default: the model's maximum)")->check(kCount);
  off->add_option("--threads", o->threads, "CPU threads (default: all, or KILN_THREADS)")->check(CLI::Range(0u, 4096u));
  CLI::App* srv = sub.add_subcommand("serve", "Load an OpenAI-compatible server over HTTP (streaming completions)");
  srv->add_option("--url", o->url, "Server address; the API is under URL/v1")->capture_default_str();
  srv->add_option("--api-key", o->api_key, "Bearer key to send");
  srv->add_option("--model", o->model, "Model id to request (default: the first of /v1/models)");
  srv->add_option("--rate", o->rate,
                  "Poisson arrivals at R requests/s instead of a fixed concurrency (open loop); a sweep: 1,2,4")
      ->check(positive_list(false));
  srv->add_option("--timeout", o->timeout, "Seconds one request may take")
      ->check(finite_range(0, 1e6, true))
      ->capture_default_str();
  workload_flags(*srv, *o);
  return [o, off] { return off->parsed() ? run_offline(*o) : run_serve(*o); };
}

}  // namespace

KILN_COMMAND(85, "bench", "Measure serving throughput and latency (in process, or against a server)", setup);

}  // namespace kiln::tools
