#include "runtime/engine/batch_generate.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>

#include "runtime/core/error.h"
#include "runtime/engine/sequence_decoder.h"

namespace kiln {
namespace {

using Clock = std::chrono::steady_clock;

// Everything one running sequence needs between steps.
struct Running {
  GenerationRequest* req = nullptr;
  GenerationOutput* out = nullptr;
  KvSequence own;                 // used when the request brings no sequence
  KvSequence* kv = nullptr;
  int64_t fed = 0;                // prompt tokens whose K/V the cache holds
  std::optional<SequenceDecoder> dec;  // sampling state, stop checker and detokenizer
  bool done = false;
};

}  // namespace

std::vector<GenerationOutput> generate_batch(Model& model, KvCache& cache, std::span<GenerationRequest> requests,
                                             const BatchOptions& options) {
  const auto t0 = Clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  const int64_t context = options.context > 0 ? options.context : model.spec().max_position_embeddings;
  const int64_t vocab = model.spec().vocab_size;
  std::vector<GenerationOutput> outputs(requests.size());
  std::vector<Running> run(requests.size());

  // Validate everything before the first forward, so a bad request leaves every cache untouched.
  for (size_t i = 0; i < requests.size(); ++i) {
    GenerationRequest& q = requests[i];
    Running& s = run[i];
    s.req = &q;
    s.out = &outputs[i];
    s.kv = q.kv ? q.kv : &s.own;
    const int64_t n = int64_t(q.prompt.size());
    if (n == 0) throw Error("the prompt is empty: nothing to continue from");
    if (n > context)
      throw Error("the prompt has " + std::to_string(n) + " tokens, more than the context of " +
                  std::to_string(context) + " tokens");
    if (s.kv->length >= n)
      throw Error("generate: the cache already holds the whole prompt; at least one token must be computed");
    s.fed = s.kv->length;
    s.out->prompt_tokens = n;
    s.out->prefilled_tokens = n - s.fed;
    // The completion may run until prompt + completion fill the context; the last token is never fed back.
    SamplingParams p = q.params;
    const int64_t budget = std::min<int64_t>(p.max_new_tokens, context - n);
    if (budget <= 0) {
      s.done = true;
      s.out->finish_reason = "length";
      continue;
    }
    p.max_new_tokens = int32_t(budget);
    s.dec.emplace(p, q.prompt, options.eos_ids, options.tokenizer);  // validates the params
    s.out->seed = s.dec->seed();
  }

  auto emit = [](Running& s, const std::string& text) {
    if (text.empty()) return;
    s.out->text += text;
    if (s.req->on_text) s.req->on_text(text);
  };
  auto finish = [&](Running& s, const char* reason) {
    emit(s, s.dec->finish());
    s.out->finish_reason = reason;
    s.out->end_seconds = seconds();
    s.done = true;
    if (!s.req->kv) cache.release(s.own);
  };

  Sampler sampler;
  std::vector<BatchEntry> batch;
  std::vector<Running*> members;
  for (;;) {
    batch.clear();
    members.clear();
    for (Running& s : run)
      if (!s.done) members.push_back(&s);
    if (members.empty()) break;
    if (options.cancelled && options.cancelled()) {
      for (Running* s : members) finish(*s, "cancelled");
      break;
    }
    // Decoding sequences always go in (one token each); prefilling ones share the chunk budget in request order.
    int64_t prefill_left = std::max<int64_t>(1, options.prefill_chunk);
    std::vector<Running*> stepping;
    for (Running* s : members) {
      const int64_t n = int64_t(s->req->prompt.size());
      if (s->fed < n) {
        if (prefill_left == 0) continue;
        const int64_t take = std::min(prefill_left, n - s->fed);
        prefill_left -= take;
        batch.push_back(
            {s->kv, std::span<const int32_t>(s->req->prompt).subspan(size_t(s->fed), size_t(take)), false, n});
        s->fed += take;
      } else {
        batch.push_back(
            {s->kv, std::span<const int32_t>(&s->out->tokens.back(), 1), false, int64_t(s->req->prompt.size())});
      }
      stepping.push_back(s);
    }
    ForwardResult r = model.forward(batch, cache);
    for (size_t e = 0; e < stepping.size(); ++e) {
      Running& s = *stepping[e];
      if (s.fed < int64_t(s.req->prompt.size())) continue;  // still prefilling: this row is not a prediction yet
      DecodeStep d = s.dec->step(sampler, std::span<const float>(r.last(e, batch), size_t(vocab)));
      if (s.out->tokens.empty()) s.out->first_token_seconds = seconds();
      s.out->tokens.push_back(d.token);
      emit(s, d.text);
      if (d.done) finish(s, s.dec->finish_reason());
    }
  }
  return outputs;
}

}  // namespace kiln
