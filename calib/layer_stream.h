#pragma once
// Calibration one decoder layer at a time, for models bigger than memory (docs/calibration.md, "Layer streaming").
// The only state between layers is the residual stream of every calibration token; each layer is loaded from its
// source (the mmapped workspace, or AWQ's transformed weights), every calibration block is run through it with an
// observer attached, and it is freed before the next one. The layer is the runtime's own DecoderBlock, so the
// statistics are those of Model::forward.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "calib/dataset.h"
#include "runtime/model/layers/tensor_source.h"
#include "runtime/model/model.h"

namespace kiln {
class Workspace;
}

namespace kiln::calib {

// The residual stream of all calibration tokens, [rows, cols] fp32: in memory, or in a temporary file (created at
// `spill_path`, removed on destruction) when it is bigger than `max_memory` bytes. Reads and writes are whole rows.
class ActivationStore {
 public:
  ActivationStore(int64_t rows, int64_t cols, uint64_t max_memory, const std::filesystem::path& spill_path);
  ~ActivationStore();
  ActivationStore(const ActivationStore&) = delete;
  ActivationStore& operator=(const ActivationStore&) = delete;
  void read(int64_t row0, int64_t rows, float* dst) const;
  void write(int64_t row0, int64_t rows, const float* src);
  bool spilled() const { return fd_ >= 0; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  int64_t rows_, cols_;
  std::vector<float> memory_;
  int fd_ = -1;
  std::filesystem::path path_;
};

struct LayerStreamOptions {
  int64_t batch_tokens = 4096;       // whole blocks per forward batch (at least one)
  uint64_t max_memory = 0;           // bytes of residual stream kept in memory; 0: default_max_memory()
  std::filesystem::path spill_path;  // where the residual stream goes when it does not fit
};

// A quarter of the physical memory: the residual stream shares the machine with one layer's weights and statistics.
uint64_t default_max_memory();

// "512M", "8G", "1.5G", "4096" (bytes; K, M, G, T are powers of 1024). Throws naming --max-memory otherwise.
uint64_t parse_memory_size(const std::string& text);
// Throws naming `dir` when its file system has fewer than `bytes` available for `what`.
void require_free_space(const std::filesystem::path& dir, uint64_t bytes, const std::string& what);

// Wall and CPU time (user + system, all threads of this process) spent on one layer, for the --json reports.
struct LayerTiming {
  double seconds = 0, cpu_seconds = 0;
};
// This process's CPU time so far (getrusage).
double process_cpu_seconds();

class LayerStream {
 public:
  // Embeds every block's tokens (the workspace's embedding layer, freed afterwards): the stream enters layer 0.
  LayerStream(const Workspace& ws, Backend& backend, const Blocks& blocks, const LayerStreamOptions& options);
  ~LayerStream();
  const ModelGraph& graph() const { return graph_; }
  int64_t num_layers() const { return int64_t(graph_.blocks.size()); }
  bool spilled() const { return store_.spilled(); }
  // Loads layer `l` from `src` and runs every block through it; `observer` (optional) sees its linear inputs and
  // K/V exactly as in Model::forward. With `advance` the stream then holds the layer's output.
  void run_layer(int64_t l, const TensorSource& src, ForwardObserver* observer, bool advance);
  // Drops the workspace's pages of layer l's tensors (or of everything outside the layer stack with l = -1), so that
  // the mmapped model does not accumulate in memory.
  void release_pages(int64_t l) const;

 private:
  struct Batch {
    int64_t first = 0, count = 0;
  };
  std::vector<Batch> batches() const;
  const Workspace& ws_;
  Backend& be_;
  ModelSpec spec_;
  ModelGraph graph_;
  int64_t seqlen_, per_batch_, count_;
  ActivationStore store_;
  Scratch scratch_;
  std::unique_ptr<KvCache> cache_;
  std::vector<float> host_;
};

}  // namespace kiln::calib
