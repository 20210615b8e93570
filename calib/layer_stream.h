#pragma once
// Calibration one decoder layer at a time, for models bigger than memory (docs/calibration.md, "Layer streaming").
// The only state between layers is the residual stream of every calibration token; each layer is loaded from its
// source (the mmapped workspace, or AWQ's transformed weights), every calibration block is run through it with an
// observer attached, and it is freed before the next one. The layer is the runtime's own DecoderBlock, so the
// statistics are those of Model::forward.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "calib/dataset.h"
#include "runtime/model/layers/embedding.h"
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
  // The attention's KV cache (calibration: fp32). I8Static takes every layer's scales, [layers * kv_heads] each.
  KvDType kv_dtype = KvDType::F32;
  std::vector<float> k_scale, v_scale;
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
  // A prefix LM's block runs as calibration_sequence() lays it out (two rows longer).
  LayerStream(const Workspace& ws, Backend& backend, const Blocks& blocks, const LayerStreamOptions& options);
  // The same for sequences of any lengths: `tokens` holds them one after another (evaluation windows). A prefix LM's
  // sequences must each hold their [gMASK] <sop> prompt (positions and attention follow Model::forward's).
  LayerStream(const Workspace& ws, Backend& backend, std::span<const int32_t> tokens, std::vector<int64_t> lengths,
              const LayerStreamOptions& options);
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

  // Logits [rows, vocab] of rows [row0, row0 + rows) of sequence i through `head`, once the stream has been through
  // every layer (rows are independent, so a long window can be taken a few rows at a time).
  void logits(int64_t i, int64_t row0, int64_t rows, const class OutputHead& head, std::vector<float>& out);
  int64_t length(int64_t i) const { return lengths_[size_t(i)]; }

  // The stream as a file, for a resumable run's checkpoint: save() writes it whole (returns its sha256), load()
  // reads it back (same shape) over the stream.
  std::string save(const std::filesystem::path& file) const;
  void load(const std::filesystem::path& file);

 private:
  struct Batch {
    int64_t first = 0, count = 0;  // sequences
    int64_t row0 = 0, rows = 0;
  };
  std::vector<Batch> batches() const;
  // Sequence i's positions (and a prefix LM's block positions), appended.
  void append_positions(int64_t i, std::vector<int32_t>& positions, std::vector<int32_t>& block_positions) const;
  void new_cache(int64_t layer);
  const Workspace& ws_;
  Backend& be_;
  ModelSpec spec_;
  ModelGraph graph_;
  std::vector<int64_t> lengths_, offsets_;  // per sequence: tokens, first row
  std::vector<PrefixLmPrompt> prompts_;     // per sequence, for a prefix LM
  int64_t batch_tokens_;
  LayerStreamOptions options_;
  ActivationStore store_;
  Scratch scratch_;
  std::unique_ptr<KvCache> cache_;
  std::vector<float> host_;
};

// A calibration block as a prefix LM (ChatGLM-6B) runs it: the first half as the bidirectional context, [gMASK] <sop>,
// then the second half as the continuation, so that the statistics cover both kinds of rows the model computes.
// Other models: the block itself.
std::vector<int32_t> calibration_sequence(const ModelSpec& spec, std::span<const int32_t> block);
// Its length for a block of `seqlen` tokens.
int64_t calibration_length(const ModelSpec& spec, int64_t seqlen);

// The model's output head: the final norm and lm_head (or the tied embedding table) loaded from `src`, applied as
// Model::forward applies them (with the final soft-capping).
class OutputHead {
 public:
  OutputHead(const TensorSource& src, Backend& backend, const ModelGraph& graph);
  const Norm& norm() const { return norm_; }
  const LinearWeight& weight() const { return *head_; }
  float softcap() const { return softcap_; }

 private:
  Norm norm_;
  Embedding table_;  // a tied head's embedding
  std::unique_ptr<LinearWeight> head_;
  float softcap_ = 0;
};

}  // namespace kiln::calib
