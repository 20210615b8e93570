// The seam's row-wise ops on the CUDA backend: validate on the host, stage metadata, launch (cuda_elementwise.cu).
#include <string>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

void CudaBackend::embedding(const EmbeddingTable& table, std::span<const int32_t> ids, float* out) {
  const auto& t = static_cast<const DeviceEmbedding&>(table);
  // Checked on the host: an out-of-range id on the device would read past the table silently.
  for (int32_t id : ids)
    if (id < 0 || id >= t.n)
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary (0.." + std::to_string(t.n - 1) + ")");
  launch_embedding(stream_, t.storage->cdata(), t.dtype, t.d, stage(0, ids), int64_t(ids.size()), out);
}

void CudaBackend::rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  // The kernel normalizes in place (x) or into y; the input is only read, so casting away const is safe when y != x.
  float* xin = const_cast<float*>(x);
  launch_rms_norm(stream_, xin, nullptr, w, y, rows, dim, dim, 1, eps);
}

void CudaBackend::add_rms_norm(float* x, const float* r, const float* w, float* y, int64_t rows, int64_t dim,
                               float eps) {
  launch_rms_norm(stream_, x, r, w, y, rows, dim, dim, 1, eps);
}

void CudaBackend::head_rms_norm(float* x, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t head_dim,
                                const float* w, float eps) {
  launch_rms_norm(stream_, x, nullptr, w, nullptr, rows, head_dim, row_stride, num_heads, eps);
}

void CudaBackend::add_bias(float* y, const float* b, int64_t rows, int64_t dim) {
  launch_add_bias(stream_, y, b, rows, dim);
}

void CudaBackend::layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t dim,
                             float eps) {
  // The input is only read when y != x (see rms_norm).
  launch_layer_norm(stream_, const_cast<float*>(x), nullptr, w, b, y, rows, dim, eps);
}

void CudaBackend::add_layer_norm(float* x, const float* r, const float* w, const float* b, float* y, int64_t rows,
                                 int64_t dim, float eps) {
  launch_layer_norm(stream_, x, r, w, b, y, rows, dim, eps);
}

void CudaBackend::rope(float* x, int64_t rows, int64_t row_stride, int64_t num_heads, const RopeLayout& layout,
                       std::span<const int32_t> positions, std::span<const int32_t> seq_of_row,
                       std::span<const float> inv_freq) {
  launch_rope(stream_, x, rows, row_stride, num_heads, layout, stage(1, positions), stage(2, seq_of_row),
              stage(3, inv_freq));
}

void CudaBackend::silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  launch_silu_mul(stream_, gate_up, out, rows, inter);
}

void CudaBackend::gelu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh_form) {
  launch_gelu_mul(stream_, gate_up, out, rows, inter, tanh_form);
}

void CudaBackend::gelu(const float* x, float* y, int64_t n, bool tanh_form) {
  launch_gelu(stream_, x, y, n, tanh_form);
}

void CudaBackend::add(float* y, const float* x, int64_t n) { launch_add(stream_, y, x, n); }

void CudaBackend::scale(float* y, float s, int64_t n) { launch_scale(stream_, y, s, n); }

void CudaBackend::softcap(float* y, int64_t n, float cap) { launch_softcap(stream_, y, n, cap); }

}  // namespace kiln::cuda
