#include "runtime/bench/http_load.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <thread>

#include "runtime/core/error.h"

namespace kiln::bench {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

struct Endpoint {
  std::string origin;  // scheme://host[:port], what httplib::Client takes
  std::string prefix;  // path before /v1, without a trailing "/"
};

Endpoint split_url(const std::string& url) {
  const size_t sep = url.find("://");
  if (sep == std::string::npos || (url.compare(0, sep, "http") != 0 && url.compare(0, sep, "https") != 0))
    throw Error("--url must start with http:// or https:// (got '" + url.substr(0, 200) + "')");
  const size_t path = url.find('/', sep + 3);
  Endpoint e{url.substr(0, path), path == std::string::npos ? "" : url.substr(path)};
  while (!e.prefix.empty() && e.prefix.back() == '/') e.prefix.pop_back();
  if (e.origin.size() <= sep + 3) throw Error("--url has no host");
  return e;
}

httplib::Headers auth_headers(const HttpTarget& t) {
  httplib::Headers h;
  if (!t.api_key.empty()) h.emplace("Authorization", "Bearer " + t.api_key);
  return h;
}

std::string error_message(int status, const std::string& body) {
  json j = json::parse(body, nullptr, false);
  std::string msg = "HTTP " + std::to_string(status);
  if (j.is_object() && j.contains("error") && j["error"].is_object() && j["error"].value("message", "") != "")
    msg += ": " + j["error"]["message"].get<std::string>();
  return msg;
}

uint64_t splitmix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class StreamingRequest {
 public:
  StreamingRequest(httplib::Client& cli, const HttpTarget& t, const std::string& path)
      : cli_(cli), t_(t), path_(path) {}

  RequestRecord run(const BenchPrompt& p, int64_t output_len) {
    json body{{"model", t_.model},  {"max_tokens", output_len}, {"temperature", 0},
              {"ignore_eos", true}, {"stream", true},           {"stream_options", {{"include_usage", true}}}};
    if (p.text.empty())
      body["prompt"] = p.tokens;
    else
      body["prompt"] = p.text;
    httplib::Request req;
    req.method = "POST";
    req.path = path_;
    req.headers = auth_headers(t_);
    req.set_header("Content-Type", "application/json");
    req.set_header("Accept", "text/event-stream");
    req.body = body.dump();
    req.response_handler = [this](const httplib::Response& res) {
      status_ = res.status;
      return true;
    };
    req.content_receiver = [this](const char* data, size_t n, uint64_t, uint64_t) {
      if (status_ != 200) {
        raw_.append(data, n);
        return raw_.size() < (1 << 16);
      }
      buffer_.append(data, n);
      return consume();
    };
    t0_ = Clock::now();
    httplib::Result res = cli_.send(req);
    rec_.e2e = seconds(t0_, Clock::now());
    if (!res)
      rec_.error = "request failed: " + httplib::to_string(res.error());
    else if (status_ != 200)
      rec_.error = error_message(status_, raw_);
    else if (!done_ && rec_.error.empty())
      rec_.error = "the stream ended without [DONE]";
    rec_.ok = rec_.error.empty();
    return rec_;
  }

 private:
  // Handles every complete SSE frame in the buffer; false stops the transfer (an error event).
  bool consume() {
    for (size_t end; (end = buffer_.find("\n\n")) != std::string::npos;) {
      const std::string frame = buffer_.substr(0, end);
      buffer_.erase(0, end + 2);
      // The frame's "data:" lines joined; comment lines (queue reports, keep-alives) and other fields are skipped.
      std::string data;
      bool has_data = false;
      for (size_t pos = 0; pos <= frame.size();) {
        size_t eol = frame.find('\n', pos);
        if (eol == std::string::npos) eol = frame.size();
        const std::string line = frame.substr(pos, eol - pos);
        if (line.rfind("data:", 0) == 0) {
          data += (has_data ? "\n" : "") + line.substr(line.rfind("data: ", 0) == 0 ? 6 : 5);
          has_data = true;
        }
        pos = eol + 1;
      }
      if (!has_data) continue;
      if (data == "[DONE]") {
        done_ = true;
        continue;
      }
      json j = json::parse(data, nullptr, false);
      if (!j.is_object()) continue;
      if (j.contains("error")) {
        rec_.error = error_message(500, data);
        return false;
      }
      if (j.contains("usage") && j["usage"].is_object()) {
        rec_.prompt_tokens = j["usage"].value("prompt_tokens", int64_t(0));
        rec_.output_tokens = j["usage"].value("completion_tokens", int64_t(0));
      }
      if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) continue;
      const json& c = j["choices"][0];
      if (c.contains("text") && c["text"].is_string() && !c["text"].get<std::string>().empty()) {
        const double t = seconds(t0_, Clock::now());
        if (rec_.token_times.empty()) rec_.ttft = t;
        rec_.token_times.push_back(t);
      }
    }
    return true;
  }

  httplib::Client& cli_;
  const HttpTarget& t_;
  std::string path_, buffer_, raw_;
  int status_ = 0;
  bool done_ = false;
  Clock::time_point t0_;
  RequestRecord rec_;
};

std::unique_ptr<httplib::Client> make_client(const Endpoint& e, double timeout_s) {
  auto cli = std::make_unique<httplib::Client>(e.origin);
  cli->set_connection_timeout(10);
  cli->set_read_timeout(std::chrono::milliseconds(int64_t(timeout_s * 1000)));
  cli->set_write_timeout(10);
  cli->set_keep_alive(true);
  return cli;
}

}  // namespace

void probe(HttpTarget& t) {
  const Endpoint e = split_url(t.url);
  auto cli = make_client(e, 10);
  httplib::Result res = cli->Get(e.prefix + "/v1/models", auth_headers(t));
  if (!res) throw Error("cannot reach " + t.url + " (" + httplib::to_string(res.error()) + ")");
  if (res->status != 200) throw Error("" + t.url + "/v1/models answered " + error_message(res->status, res->body));
  if (!t.model.empty()) return;
  json j = json::parse(res->body, nullptr, false);
  if (!j.is_object() || !j.contains("data") || !j["data"].is_array() || j["data"].empty() ||
      !j["data"][0].contains("id") || !j["data"][0]["id"].is_string())
    throw Error("" + t.url + "/v1/models lists no model; give --model");
  t.model = j["data"][0]["id"].get<std::string>();
}

std::vector<RequestRecord> run_http(const HttpTarget& t, const std::vector<BenchPrompt>& prompts, int64_t output_len,
                                    int64_t concurrency, double rate, uint64_t seed, double* duration_s) {
  const Endpoint e = split_url(t.url);
  const std::string path = e.prefix + "/v1/completions";
  std::vector<RequestRecord> records(prompts.size());
  std::vector<std::thread> threads;
  const Clock::time_point start = Clock::now();
  if (rate > 0) {
    uint64_t state = seed ^ 0x5eedull;
    double arrival = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::this_thread::sleep_until(
          start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(arrival)));
      threads.emplace_back([&, i] {
        auto cli = make_client(e, t.timeout_s);
        records[i] = StreamingRequest(*cli, t, path).run(prompts[i], output_len);
      });
      const double u = double(splitmix(state) >> 11) * 0x1.0p-53;  // [0, 1)
      arrival += -std::log1p(-u) / rate;
    }
  } else {
    std::atomic<size_t> next{0};
    for (int64_t w = 0; w < std::max<int64_t>(1, concurrency); ++w)
      threads.emplace_back([&] {
        auto cli = make_client(e, t.timeout_s);
        for (size_t i; (i = next++) < prompts.size();)
          records[i] = StreamingRequest(*cli, t, path).run(prompts[i], output_len);
      });
  }
  for (std::thread& th : threads) th.join();
  *duration_s = seconds(start, Clock::now());
  return records;
}

}  // namespace kiln::bench
