// Weight upload for the CUDA backend: dense tensors keep their workspace dtype and [out, in] layout (cuBLAS reads
// them transposed, see cuda_matmul.cu); int4 weights are repacked for the GEMV (cuda_backend.cuh, Int4Weight).
#include <cuda_fp16.h>

#include <cstring>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

void check_float_dtype(DType dtype, const char* what) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw Error(std::string(what) + " must be fp32, fp16 or bf16, not " + std::string(dtype_name(dtype)));
}

// fp16 bits to fp32 on the host (the workspace stores int4 scales as fp16).
float half_bits_to_float(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}

}  // namespace

std::unique_ptr<LinearWeight> CudaBackend::pack_linear(const void* data, DType dtype, int64_t out, int64_t in) {
  check_float_dtype(dtype, "linear weight");
  auto w = std::make_unique<DenseWeight>();
  w->out = out;
  w->in = in;
  w->dtype = dtype;
  const size_t bytes = size_t(out * in) * dtype_size(dtype);
  w->storage = std::make_shared<DeviceBuffer>(*this, bytes);
  upload(*w->storage, 0, data, bytes);
  return w;
}

std::unique_ptr<EmbeddingTable> CudaBackend::load_embedding(const void* data, DType dtype, int64_t rows, int64_t dim) {
  check_float_dtype(dtype, "embedding table");
  auto t = std::make_unique<DeviceEmbedding>();
  t->n = rows;
  t->d = dim;
  t->dtype = dtype;
  const size_t bytes = size_t(rows * dim) * dtype_size(dtype);
  t->storage = std::make_shared<DeviceBuffer>(*this, bytes);
  upload(*t->storage, 0, data, bytes);
  return t;
}

std::unique_ptr<LinearWeight> CudaBackend::pack_tied_head(const EmbeddingTable& table) {
  // The embedding's [vocab, hidden] rows are already an [out, in] weight: share the device bytes.
  const auto& t = static_cast<const DeviceEmbedding&>(table);
  auto w = std::make_unique<DenseWeight>();
  w->out = t.n;
  w->in = t.d;
  w->dtype = t.dtype;
  w->storage = t.storage;
  return w;
}

std::unique_ptr<LinearWeight> CudaBackend::pack_linear_int4(const Int4WeightView& v) {
  if (v.group_size <= 0 || v.group_size % 2 || v.in <= 0 || v.out <= 0 || v.in % v.group_size)
    throw Error("int4 weight [" + std::to_string(v.out) + ", " + std::to_string(v.in) + "] with group size " +
                std::to_string(v.group_size) + " is not a valid int4 layout");
  auto w = std::make_unique<Int4Weight>();
  w->out = v.out;
  w->in = v.in;
  w->group_size = v.group_size;
  w->row_bytes = (v.in / 2 + 15) / 16 * 16;
  const int64_t G = w->groups(), src_row = v.in / 2;
  std::vector<uint8_t> q(size_t(v.out * w->row_bytes), 0);
  for (int64_t o = 0; o < v.out; ++o)
    std::memcpy(&q[size_t(o * w->row_bytes)], v.qweight + o * src_row, size_t(src_row));
  std::vector<float2> sz(size_t(v.out * G));
  for (int64_t i = 0; i < v.out * G; ++i) {
    uint16_t bits;
    std::memcpy(&bits, v.scales + 2 * i, 2);
    const float s = half_bits_to_float(bits);
    sz[size_t(i)] = make_float2(s, float(v.zeros[i]) * s);  // z * s is exact: 4-bit z, 11-bit s
  }
  w->q = std::make_unique<DeviceBuffer>(*this, q.size());
  upload(*w->q, 0, q.data(), q.size());
  w->sz = std::make_unique<DeviceBuffer>(*this, sz.size() * sizeof(float2));
  upload(*w->sz, 0, sz.data(), sz.size() * sizeof(float2));
  return w;
}

}  // namespace kiln::cuda
