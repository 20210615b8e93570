#include "runtime/model/layers/tensor_source.h"

#include <cstring>

#include "runtime/core/error.h"
#include "runtime/workspace/workspace.h"

namespace kiln {

WorkspaceSource::WorkspaceSource(const Workspace& ws)
    : ws_(ws), quant_(weight_quantization_from_json(ws.info().json, ws.info().dir.string() + "/kiln.json")) {}

TensorView WorkspaceSource::get(const std::string& name) const {
  const Workspace::Tensor& t = ws_.get(name);
  return {t.data(), t.info->dtype, t.info->shape};
}

std::optional<Int4WeightView> WorkspaceSource::int4(const std::string& weight_name) const {
  std::string layer_suffix = weight_name;
  int64_t layer = 0;
  names::split_layer(weight_name, layer, layer_suffix);
  if (!quant_.covers(layer_suffix)) return std::nullopt;
  const Workspace::Tensor& qw = ws_.get(int4_name(weight_name, "qweight"));
  Int4WeightView v;
  v.qweight = qw.data();
  v.scales = ws_.get(int4_name(weight_name, "scales")).data();
  v.zeros = ws_.get(int4_name(weight_name, "zeros")).data();
  v.out = qw.info->shape[0];
  v.in = qw.info->shape[1] * 2;
  v.group_size = quant_.group_size;
  return v;
}

std::optional<Int8WeightView> WorkspaceSource::int8_head() const {
  if (!quant_.head.int8()) return std::nullopt;
  const ModelSpec& spec = ws_.spec();
  const int64_t V = spec.vocab_size, H = spec.hidden_size;
  if (H % kInt8HeadGroup)
    throw Error(ws_.info().dir.string() + ": quantization.head is int8 but hidden_size " + std::to_string(H) +
                " is not a multiple of " + std::to_string(kInt8HeadGroup));
  auto tensor = [&](const char* part, DType dtype, std::vector<int64_t> shape) {
    const std::string name = int4_name(names::kLmHead, part);
    const Workspace::Tensor& t = ws_.get(name);
    if (t.info->dtype != dtype || t.info->shape != shape)
      throw Error(ws_.info().dir.string() + ": int8 head tensor " + name + " must be " +
                  std::string(dtype_name(dtype)) + " [" + std::to_string(shape[0]) + ", " + std::to_string(shape[1]) +
                  "]");
    return t.data();
  };
  Int8WeightView v;
  v.qweight = reinterpret_cast<const int8_t*>(tensor("qweight", DType::I8, {V, H}));
  v.scales = tensor("scales", DType::F16, {V, H / kInt8HeadGroup});
  v.out = V;
  v.in = H;
  v.group_size = kInt8HeadGroup;
  return v;
}

void HostSource::add(const std::string& name, const std::vector<float>& data, std::vector<int64_t> shape) {
  tensors_[name] = {data.data(), DType::F32, std::move(shape)};
}

TensorView HostSource::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error("tensor '" + name + "' is missing");
  return it->second;
}

namespace {
std::vector<float> to_f32(const TensorView& t) {
  uint64_t n = 1;
  for (int64_t d : t.shape) n *= uint64_t(d);
  std::vector<float> v(n);
  const auto* p = static_cast<const uint8_t*>(t.data);
  if (t.dtype == DType::F32) {
    std::memcpy(v.data(), p, n * 4);
  } else {
    for (uint64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      v[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
  return v;
}

std::unique_ptr<Buffer> upload(Backend& backend, const std::vector<float>& v) {
  auto buf = backend.alloc(v.size() * sizeof(float));
  backend.upload(*buf, 0, v.data(), v.size() * sizeof(float));
  return buf;
}
}  // namespace

std::unique_ptr<Buffer> upload_f32(Backend& backend, const TensorView& t) { return upload(backend, to_f32(t)); }

std::unique_ptr<Buffer> upload_norm_weight(Backend& backend, const TensorView& t, bool plus_one) {
  std::vector<float> v = to_f32(t);
  if (plus_one)
    for (float& x : v) x = 1.0f + x;
  return upload(backend, v);
}

std::unique_ptr<LinearWeight> pack_linear(Backend& backend, const TensorSource& src, const std::string& weight_name) {
  if (auto q = src.int4(weight_name)) return backend.pack_linear_int4(*q);
  const TensorView t = src.get(weight_name);
  return backend.pack_linear(t.data, t.dtype, t.shape[0], t.shape[1]);
}

std::unique_ptr<LinearWeight> pack_output_head(Backend& backend, const TensorSource& src, const EmbeddingTable* tied) {
  if (auto h = src.int8_head()) return backend.pack_linear_int8(*h);
  if (tied) return backend.pack_tied_head(*tied);
  return pack_linear(backend, src, names::kLmHead);
}

}  // namespace kiln
