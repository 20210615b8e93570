#pragma once
// The CPU backend: the reference implementation of the backend seam and a product backend in its own right.
// Ops are plain loops split over a thread pool; only the matmul (matmul_x86.cpp) uses intrinsics, chosen at run time
// (AVX-512, else AVX2+FMA+F16C, else scalar).
#include <memory>
#include <vector>

#include "runtime/backend/backend.h"
#include "runtime/cpu/matmul.h"
#include "runtime/cpu/thread_pool.h"

namespace kiln::cpu {

class HostBuffer : public Buffer {
 public:
  explicit HostBuffer(size_t bytes);
  void* data() override { return data_.get(); }
  size_t bytes() const override { return bytes_; }

 private:
  struct Free {
    Free() : huge_bytes(0) {}
    explicit Free(size_t huge) : huge_bytes(huge) {}
    size_t huge_bytes;  // a map_huge mapping of these bytes, or 0: aligned_alloc
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_;
  size_t bytes_;
};

struct HostEmbedding : EmbeddingTable {
  int64_t n = 0, d = 0;
  DType dtype = DType::F32;
  std::vector<uint8_t> data;
  int64_t rows() const override { return n; }
  int64_t dim() const override { return d; }
};

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(unsigned threads, MatmulIsa isa = best_matmul_isa());
  std::string name() const override;
  bool host_memory() const override { return true; }
  void host_parallel_for(int64_t n, const std::function<void(int64_t)>& fn) override {
    pool_.parallel_for(
        n,
        [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) fn(i);
        },
        1);
  }
  ThreadPool& pool() { return pool_; }
  MatmulIsa isa() const { return isa_; }

  std::unique_ptr<Buffer> alloc(size_t bytes) override;
  void upload(Buffer& dst, size_t offset, const void* src, size_t bytes) override;
  void download(const Buffer& src, size_t offset, void* dst, size_t bytes) override;

  std::unique_ptr<LinearWeight> pack_linear(const void* data, DType dtype, int64_t out, int64_t in) override;
  std::unique_ptr<LinearWeight> pack_linear_int4(const Int4WeightView& w) override;  // matmul_int4.h
  std::unique_ptr<LinearWeight> pack_linear_int8(const Int8WeightView& w) override;  // matmul_int8.h
  std::unique_ptr<EmbeddingTable> load_embedding(const void* data, DType dtype, int64_t rows, int64_t dim) override;
  std::unique_ptr<LinearWeight> pack_tied_head(const EmbeddingTable& table) override;

  KILN_BACKEND_OPS(KILN_OP_OVERRIDE)
  std::unique_ptr<AwqOps> make_awq_ops() override;  // cpu_awq_ops.cpp

 private:
  ThreadPool pool_;
  MatmulIsa isa_;
  // The cos and sin of the last rope call's angles, [rows][half] (rope): every layer's q and k in a step rotate by
  // the same angles, and computing them (a double sin and cos per row and pair, per call) was 2.5% of a batch-32
  // decode step.
  struct RopeAngles {
    std::vector<int32_t> positions, seq_of_row;
    std::vector<float> inv_freq, cos, sin;
    int64_t half = 0;
  } rope_angles_;
};

}  // namespace kiln::cpu
