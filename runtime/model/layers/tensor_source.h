#pragma once
// Where layers load their weights from: a workspace (the model) or fp32 host arrays (AWQ's block losses, which run a
// layer with one weight replaced). Names are canonical (docs/workspace.md).
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/model/model_spec.h"

namespace kiln {

class Workspace;

struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  // The tensor `name`; throws kiln::Error naming it when absent.
  virtual TensorView get(const std::string& name) const = 0;
  // The int4 parts of linear weight `weight_name` ("X.weight") when the source stores it quantized.
  virtual std::optional<Int4WeightView> int4(const std::string& weight_name) const { return std::nullopt; }
  // The int8 output head (quantization.head) when the source stores one.
  virtual std::optional<Int8WeightView> int8_head() const { return std::nullopt; }
};

// The tensors of a workspace, int4 ones included (quantization.weights in kiln.json).
class WorkspaceSource : public TensorSource {
 public:
  explicit WorkspaceSource(const Workspace& ws);
  TensorView get(const std::string& name) const override;
  std::optional<Int4WeightView> int4(const std::string& weight_name) const override;
  // Checks the two tensors' dtypes and shapes against the spec (a one-line error naming the tensor).
  std::optional<Int8WeightView> int8_head() const override;

 private:
  const Workspace& ws_;
  WeightQuantization quant_;
};

// fp32 host arrays by name; the caller keeps them alive while layers load.
class HostSource : public TensorSource {
 public:
  void add(const std::string& name, const std::vector<float>& data, std::vector<int64_t> shape);
  TensorView get(const std::string& name) const override;

 private:
  std::map<std::string, TensorView> tensors_;
};

// Weights moved into a backend: norm vectors and biases as fp32 buffers, linear weights packed.
std::unique_ptr<Buffer> upload_f32(Backend& backend, const TensorView& t);
// A norm weight as fp32, as (1 + w) when `plus_one` (Gemma's norms: widen, then add one, as transformers does).
std::unique_ptr<Buffer> upload_norm_weight(Backend& backend, const TensorView& t, bool plus_one);
std::unique_ptr<LinearWeight> pack_linear(Backend& backend, const TensorSource& src, const std::string& weight_name);
// The output head as Model::forward and the layer-streamed quality report use it: the int8 head when the source has
// one, else the tied embedding table (`tied`, which must then be non-null) or lm_head.weight.
std::unique_ptr<LinearWeight> pack_output_head(Backend& backend, const TensorSource& src, const EmbeddingTable* tied);

}  // namespace kiln
