#include "quant/quantize_resume.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/io/staging_dir.h"

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

namespace {

constexpr const char* kStateFile = "state.json";
constexpr const char* kFormat = "kiln-quantize-resume";

std::string layer_file_name(int64_t l) {
  char name[32];
  std::snprintf(name, sizeof(name), "layer-%05lld.bin", static_cast<long long>(l));
  return name;
}

void sync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// Why `file` does not hold what the state recorded, or empty when it does.
std::string check_file(const fs::path& file, uint64_t size, const std::string& sha256) {
  std::error_code ec;
  const uint64_t actual = fs::file_size(file, ec);
  if (ec) return "it is missing";
  if (actual != size) return "it has " + std::to_string(actual) + " bytes, not " + std::to_string(size);
  if (sha256_file(file.string()) != sha256) return "its sha256 differs from the recorded one";
  return {};
}

}  // namespace

ResumeState::ResumeState(fs::path dir, ordered_json options, bool with_stream, const std::string& label)
    : dir_(std::move(dir)), options_(std::move(options)), with_stream_(with_stream) {
  Sha256 h;
  const std::string text = options_.dump();
  h.update(text.data(), text.size());
  key_ = h.hex_digest();
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (!fs::is_directory(dir_)) throw Error(dir_.string() + ": cannot create the resume directory");
  if (fs::exists(dir_ / kStateFile)) load(options_, label);
}

ResumeState::~ResumeState() {
  if (out_) std::fclose(out_);
}

void ResumeState::load(const ordered_json& options, const std::string& label) {
  const fs::path state = dir_ / kStateFile;
  ordered_json j;
  try {
    j = ordered_json::parse(read_text_file(state));
  } catch (const json::exception&) {
    std::fprintf(stderr, "kiln quantize: %s is not valid JSON; starting %s from layer 0\n", state.c_str(),
                 label.c_str());
    return;
  }
  const auto text = [&](const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : ""; };
  if (!j.is_object() || text("format") != kFormat || !j.contains("options") || !j["options"].is_object() ||
      !j.contains("layers") || !j["layers"].is_array())
    throw Error(state.string() + ": not a kiln quantize resume state; rerun without --resume to start over");
  if (text("key") != key_) {
    // Name the first option that differs, so the user knows which flag (or input) changed.
    const ordered_json& was = j["options"];
    const ordered_json& now = options;
    std::string what = "its key";
    for (auto it = now.begin(); it != now.end(); ++it)
      if (!was.contains(it.key()) || was[it.key()] != it.value()) {
        what = it.key() + " (" + (was.contains(it.key()) ? was[it.key()].dump() : "absent") + ", now " +
               it.value().dump() + ")";
        break;
      }
    throw Error(label + ": the partial results in " + dir_.parent_path().string() + " were made with a different " +
                what + "; rerun with the same input and options, or without --resume to start over");
  }
  try {
    for (const ordered_json& l : j["layers"]) {
      Layer layer{l.at("file").get<std::string>(), l.at("sha256").get<std::string>(), l.at("size").get<uint64_t>(),
                  l.at("record")};
      if (layer.file != layer_file_name(int64_t(layers_.size())))
        throw Error(state.string() + ": unexpected layer file '" + layer.file + "'");
      layers_.push_back(std::move(layer));
    }
    if (with_stream_ && !layers_.empty() && j.contains("stream") && j["stream"].is_object()) {
      stream_ = j["stream"].at("file").get<std::string>();
      stream_sha256_ = j["stream"].at("sha256").get<std::string>();
      stream_size_ = j["stream"].at("size").get<uint64_t>();
    }
  } catch (const json::exception& e) {
    throw Error(state.string() + ": malformed resume state (" + e.what() + "); rerun without --resume to start over");
  }
  // Every finished layer's file must hold what was recorded; from the first that does not, results are recomputed.
  for (size_t l = 0; l < layers_.size(); ++l) {
    const std::string why = check_file(dir_ / layers_[l].file, layers_[l].size, layers_[l].sha256);
    if (why.empty()) continue;
    // AWQ keeps only the stream entering the first unfinished layer, so it has to start over from layer 0.
    const size_t keep = with_stream_ ? 0 : l;
    std::fprintf(stderr, "kiln quantize: %s is damaged (%s); recomputing from layer %zu\n",
                 (dir_ / layers_[l].file).c_str(), why.c_str(), keep);
    layers_.resize(keep);
    break;
  }
  if (with_stream_ && !layers_.empty()) {
    std::string why = stream_.empty() ? "it is not recorded" : check_file(stream_file(), stream_size_, stream_sha256_);
    if (!why.empty()) {
      std::fprintf(stderr, "kiln quantize: the saved activations %s are damaged (%s); recomputing from layer 0\n",
                   stream_file().c_str(), why.c_str());
      layers_.clear();
    }
  }
  if (layers_.empty()) stream_.clear();
  write_state();
}

const MappedFile& ResumeState::layer_file(int64_t l) {
  if (l < 0 || l >= layers_done()) throw Error("resume: layer " + std::to_string(l) + " is not finished");
  // Maps stay until this object goes: the workspace writer hashes copied ranges after copy_range() returns.
  if (mapped_.size() <= size_t(l)) mapped_.resize(size_t(l) + 1);
  if (!mapped_[size_t(l)]) mapped_[size_t(l)] = std::make_unique<MappedFile>((dir_ / layers_[size_t(l)].file).string());
  return *mapped_[size_t(l)];
}

void ResumeState::begin_layer() {
  const fs::path tmp = dir_ / (layer_file_name(layers_done()) + ".tmp");
  out_ = std::fopen(tmp.c_str(), "wb");
  if (!out_) throw Error(tmp.string() + ": cannot create: " + std::strerror(errno));
  hash_ = std::make_unique<Sha256>();
  written_ = 0;
}

void ResumeState::write(const void* bytes, size_t n) {
  if (std::fwrite(bytes, 1, n, out_) != n)
    throw Error((dir_ / layer_file_name(layers_done())).string() + ": write failed: " + std::strerror(errno));
  hash_->update(bytes, n);
  written_ += n;
}

void ResumeState::end_layer(ordered_json record, const std::function<std::string(const fs::path&)>& save) {
  const int64_t l = layers_done();
  const std::string name = layer_file_name(l);
  const bool ok = std::fflush(out_) == 0 && ::fsync(::fileno(out_)) == 0;
  const bool closed = std::fclose(out_) == 0;
  out_ = nullptr;
  if (!ok || !closed) throw Error((dir_ / name).string() + ": write failed");
  fs::rename(dir_ / (name + ".tmp"), dir_ / name);
  layers_.push_back({name, hash_->hex_digest(), written_, std::move(record)});
  const std::string old_stream = stream_;
  if (save) {
    // Named by the layer it enters, so the state on disk keeps naming an intact stream until it is replaced.
    stream_ = "stream-" + layer_file_name(l + 1).substr(6);
    stream_sha256_ = save(dir_ / stream_);
    stream_size_ = fs::file_size(dir_ / stream_);
  }
  write_state();
  if (!old_stream.empty() && old_stream != stream_) {
    std::error_code ec;
    fs::remove(dir_ / old_stream, ec);
  }
}

void ResumeState::write_state() {
  ordered_json layers = ordered_json::array();
  for (const Layer& l : layers_)
    layers.push_back({{"file", l.file}, {"size", l.size}, {"sha256", l.sha256}, {"record", l.record}});
  ordered_json j = {{"format", kFormat}, {"version", 1}, {"key", key_}, {"options", options_}, {"layers", layers}};
  j["stream"] = stream_.empty() ? ordered_json(nullptr)
                                : ordered_json{{"file", stream_}, {"size", stream_size_}, {"sha256", stream_sha256_}};
  const fs::path tmp = dir_ / (std::string(kStateFile) + ".tmp");
  write_text_file(tmp, j.dump(1) + "\n");
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  fs::rename(tmp, dir_ / kStateFile);
  sync_dir(dir_);
}

void test_signal_after_layer(int64_t layer) {
  const char* env = std::getenv("KILN_TEST_SIGNAL_AFTER_LAYER");
  if (!env) return;
  const std::string spec = env;
  const size_t colon = spec.find(':');
  if (colon == std::string::npos || std::atoll(spec.substr(0, colon).c_str()) != layer) return;
  const std::string sig = spec.substr(colon + 1);
  std::raise(sig == "KILL" ? SIGKILL : sig == "TERM" ? SIGTERM : SIGINT);
}

}  // namespace kiln
