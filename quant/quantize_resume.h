#pragma once
// kiln quantize --resume (docs/quantization.md, "Resuming"): each finished layer's output tensors are kept as one file
// in resume/ inside the staging directory, recorded with its size and sha256 in resume/state.json together with a key
// of everything the bytes depend on (kiln version, the input's kiln.json, method and options, calibration data). AWQ
// also keeps the residual stream entering the next layer, so the search continues where it stopped. A later run with
// the same key takes the finished layers from these files; another key is refused, a damaged file is dropped (with
// what depends on it) and recomputed. Every file is written to a temporary name, synced and renamed, and state.json
// last, so a SIGKILL at any point leaves a consistent state.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "runtime/io/mapped_file.h"
#include "runtime/io/sha256.h"

namespace kiln {

class ResumeState {
 public:
  // `dir` is created when missing. `options` is the key's content; `with_stream`: the state is only usable with its
  // saved residual stream (AWQ). Throws kiln::Error naming the first differing option when the state was made with
  // other inputs or options; `label` names the output in messages.
  ResumeState(std::filesystem::path dir, nlohmann::ordered_json options, bool with_stream, const std::string& label);
  ~ResumeState();

  int64_t layers_done() const { return int64_t(layers_.size()); }
  // What end_layer() recorded for a finished layer.
  const nlohmann::ordered_json& record(int64_t l) const { return layers_[size_t(l)].record; }
  // A finished layer's tensors, mapped (until this object is destroyed).
  const MappedFile& layer_file(int64_t l);
  // The residual stream entering layer layers_done() (with_stream only).
  std::filesystem::path stream_file() const { return dir_ / stream_; }

  // Layer layers_done(): its tensors' bytes in output order, then end_layer(). `save_stream` (AWQ, all but the last
  // layer) writes the stream entering the next layer to the path it is given and returns its sha256.
  void begin_layer();
  void write(const void* bytes, size_t n);
  void end_layer(nlohmann::ordered_json record, const std::function<std::string(const std::filesystem::path&)>& save);

 private:
  struct Layer {
    std::string file, sha256;
    uint64_t size = 0;
    nlohmann::ordered_json record;
  };
  void load(const nlohmann::ordered_json& options, const std::string& label);
  void write_state();
  std::filesystem::path dir_;
  nlohmann::ordered_json options_;
  std::string key_;
  bool with_stream_;
  std::vector<Layer> layers_;
  std::string stream_, stream_sha256_;
  uint64_t stream_size_ = 0;
  // The layer being written.
  std::FILE* out_ = nullptr;
  std::unique_ptr<Sha256> hash_;
  uint64_t written_ = 0;
  std::vector<std::unique_ptr<MappedFile>> mapped_;
};

// Test hook: KILN_TEST_SIGNAL_AFTER_LAYER="K:INT|TERM|KILL" makes kiln send itself that signal once layer K's
// results are saved, so the tests can interrupt a run at an exact layer. Does nothing when unset.
void test_signal_after_layer(int64_t layer);

}  // namespace kiln
