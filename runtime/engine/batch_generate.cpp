#include "runtime/engine/batch_generate.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "runtime/core/error.h"
#include "runtime/engine/scheduler.h"

namespace kiln {

std::vector<GenerationOutput> generate_batch(Model& model, KvCache& cache, std::span<GenerationRequest> requests,
                                             const BatchOptions& options) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  SchedulerOptions so;
  so.context = options.context > 0 ? options.context : model.spec().max_position_embeddings;
  // Every sequence decodes in each step, and the prompt tokens share prefill_chunk on top.
  so.max_batch_tokens = std::max<int64_t>(1, options.prefill_chunk) + int64_t(requests.size());
  so.max_running = std::max<int64_t>(1, int64_t(requests.size()));
  so.eos_ids = options.eos_ids;
  so.tokenizer = options.tokenizer;
  so.prefix_cache = false;  // a caller's sequence brings its own prefix (chat turns)
  Scheduler scheduler(model, cache, so);

  // Validate everything before the first forward, so a bad request leaves every cache untouched.
  std::vector<GenerationOutput> outputs(requests.size());
  std::vector<std::unique_ptr<Sequence>> queued;
  std::string error;
  for (size_t i = 0; i < requests.size(); ++i) {
    GenerationRequest& q = requests[i];
    GenerationOutput& out = outputs[i];
    const int64_t n = int64_t(q.prompt.size());
    if (n > so.context)
      throw Error("the prompt has " + std::to_string(n) + " tokens, more than the context of " +
                  std::to_string(so.context) + " tokens");
    out.prompt_tokens = n;
    out.prefilled_tokens = n - (q.kv ? q.kv->length : 0);
    if (n > 0 && std::min<int64_t>(q.params.max_new_tokens, so.context - n) <= 0 && !(q.kv && q.kv->length >= n)) {
      out.finish_reason = "length";  // no room for even one token
      continue;
    }
    auto seqs = scheduler.make_request(q.prompt, q.params, 1, {}, q.kv);
    Sequence& s = *seqs[0];
    out.seed = s.dec->seed();
    auto emit = [&q, &out](const std::string& text) {
      if (text.empty()) return;
      out.text += text;
      if (q.on_text) q.on_text(text);
    };
    s.on_token = [&out, emit, &seconds](Sequence&, DecodeStep& d) {
      if (out.tokens.empty()) out.first_token_seconds = seconds();
      out.tokens.push_back(d.token);
      emit(d.text);
    };
    s.on_finish = [&out, emit, &seconds, &error](Sequence&, const std::string& reason, const std::string& err,
                                                 std::string tail) {
      emit(tail);
      out.finish_reason = reason;
      out.end_seconds = seconds();
      if (!err.empty() && error.empty()) error = err;
    };
    queued.push_back(std::move(seqs[0]));
  }
  for (auto& s : queued) scheduler.enqueue(std::move(s));

  while (!scheduler.idle()) {
    if (options.cancelled && options.cancelled()) {
      scheduler.cancel_all();
      break;
    }
    if (!scheduler.step() && !scheduler.idle()) throw Error("internal: the scheduler stalled with requests waiting");
  }
  if (!error.empty()) throw Error(error);
  return outputs;
}

}  // namespace kiln
