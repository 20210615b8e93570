#pragma once
// The CUDA backend (docs/cuda.md). Activations stay fp32 in device memory, as the seam asks; weights live on the
// device in their storage dtype (fp32/fp16/bf16, or int4 repacked for the GEMV). Every op is enqueued on one stream;
// host-side metadata (ids, positions, block tables) is staged into device slots on that stream, so the only
// synchronizations are upload() (load time) and download() (the logits, once per forward).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cuda/cuda_check.cuh"

namespace kiln {
class KvCache;
}

namespace kiln::cuda {

class CudaBackend;

// Device memory from the backend's stream-ordered pool (cudaMallocAsync): freeing returns it to the pool, which keeps
// it (release threshold = unlimited), so scratch regrowth never goes back to the driver.
class DeviceBuffer : public Buffer {
 public:
  DeviceBuffer(CudaBackend& owner, size_t bytes);
  ~DeviceBuffer() override;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() override { return ptr_; }
  size_t bytes() const override { return bytes_; }
  const void* cdata() const { return ptr_; }

 private:
  CudaBackend& owner_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A dense linear weight: [out, in] row-major in its storage dtype. `storage` may be shared with an embedding table
// (tied output head), so it is reference counted.
struct DenseWeight : LinearWeight {
  int64_t out = 0, in = 0;
  DType dtype = DType::F32;
  std::shared_ptr<DeviceBuffer> storage;
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
};

// An int4 weight repacked for the GEMV (docs/cuda.md, "Int4 layout on the device"):
//  - q: [out][row_bytes] canonical nibble order (input k in byte k/2, even k in the low nibble), each row padded to a
//    multiple of 16 bytes so every lane's 128-bit load is aligned;
//  - sz: [out][groups] float2 (scale, zero * scale), so dequantization is one FMA per group term.
struct Int4Weight : LinearWeight {
  int64_t out = 0, in = 0, group_size = 0, row_bytes = 0;
  std::unique_ptr<DeviceBuffer> q, sz;
  int64_t out_features() const override { return out; }
  int64_t in_features() const override { return in; }
  int64_t groups() const { return in / group_size; }
  // The GEMV reads 32 inputs per lane-load; they must lie in one group.
  bool gemv_ok() const { return in % 32 == 0 && group_size % 32 == 0; }
};

struct DeviceEmbedding : EmbeddingTable {
  int64_t n = 0, d = 0;
  DType dtype = DType::F32;
  std::shared_ptr<DeviceBuffer> storage;
  int64_t rows() const override { return n; }
  int64_t dim() const override { return d; }
};

// Rows at or below this count take the int4 GEMV; larger batches dequantize to fp16 and call cuBLAS.
constexpr int64_t kInt4GemvMaxRows = 8;

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  std::string name() const override;
  size_t free_memory() const override;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  // Device memory from the pool; throws kiln::Error naming the size asked and the memory free.
  void* pool_alloc(size_t bytes);
  void pool_free(void* p);
  // Copies `n` host values to device scratch on the stream and returns the device pointer. Slots are reused on the
  // next call with the same `slot` (stream order makes that safe: the copy runs after the previous kernels).
  template <class T>
  const T* stage(int slot, std::span<const T> host) {
    return static_cast<const T*>(stage_bytes(slot, host.data(), host.size_bytes()));
  }
  // Device scratch of at least `bytes`, kept for reuse (the dequantized int4 tile, casted activations).
  void* scratch(int slot, size_t bytes);

  std::unique_ptr<Buffer> alloc(size_t bytes) override;
  void upload(Buffer& dst, size_t offset, const void* src, size_t bytes) override;
  void download(const Buffer& src, size_t offset, void* dst, size_t bytes) override;

  std::unique_ptr<LinearWeight> pack_linear(const void* data, DType dtype, int64_t out, int64_t in) override;
  std::unique_ptr<LinearWeight> pack_linear_int4(const Int4WeightView& w) override;
  std::unique_ptr<EmbeddingTable> load_embedding(const void* data, DType dtype, int64_t rows, int64_t dim) override;
  std::unique_ptr<LinearWeight> pack_tied_head(const EmbeddingTable& table) override;

  KILN_BACKEND_OPS(KILN_OP_OVERRIDE)
  std::unique_ptr<AwqOps> make_awq_ops() override;  // cuda_awq.cu

 private:
  void* stage_bytes(int slot, const void* src, size_t bytes);
  void dense_matmul(const float* x, int64_t rows, const DenseWeight& w, float* y);
  void int4_matmul(const float* x, int64_t rows, const Int4Weight& w, float* y);

  int device_ = 0;
  std::string device_name_;
  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  std::vector<Scratch> staging_, scratch_;
};

// ---- kernel launchers (one .cu each; every one checks its launch and names the kernel in errors)
void launch_embedding(cudaStream_t s, const void* table, DType dtype, int64_t dim, const int32_t* ids, int64_t rows,
                      float* out);
void launch_rms_norm(cudaStream_t s, float* x, const float* r, const float* w, float* y, int64_t rows, int64_t dim,
                     int64_t row_stride, int64_t heads, float eps);
// LayerNorm of each row (x += r first when r is set); b may be null, y may alias x or r.
void launch_layer_norm(cudaStream_t s, float* x, const float* r, const float* w, const float* b, float* y, int64_t rows,
                       int64_t dim, float eps);
void launch_rope(cudaStream_t s, float* x, int64_t rows, int64_t row_stride, int64_t num_heads,
                 const RopeLayout& layout, const int32_t* positions, const int32_t* seq_of_row, const float* inv_freq);
void launch_silu_mul(cudaStream_t s, const float* gate_up, float* out, int64_t rows, int64_t inter);
void launch_gelu_mul(cudaStream_t s, const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh_form);
void launch_gelu(cudaStream_t s, const float* x, float* y, int64_t n, bool tanh_form);
void launch_scale(cudaStream_t s, float* y, float scale, int64_t n);
void launch_softcap(cudaStream_t s, float* y, int64_t n, float cap);
void launch_add(cudaStream_t s, float* y, const float* x, int64_t n);
void launch_add_bias(cudaStream_t s, float* y, const float* b, int64_t rows, int64_t dim);
void launch_gather_rows(cudaStream_t s, const float* x, int64_t dim, const int32_t* rows, int64_t n, float* out);
// fp32 activations to the weight's 16-bit dtype for cuBLAS.
void launch_cast_f32(cudaStream_t s, const float* x, int64_t n, DType to, void* out);
void launch_int4_gemv(cudaStream_t s, const float* x, int64_t rows, const Int4Weight& w, float* y);
void launch_int4_dequant_f16(cudaStream_t s, const Int4Weight& w, void* out);

}  // namespace kiln::cuda
