// Linear layers on the CUDA backend. Dense weights: cuBLAS with fp32 accumulation (fp32 weights: SGEMM, exact fp32;
// fp16/bf16 weights: the fp32 activations are rounded to the weight dtype, GemmEx with CUBLAS_COMPUTE_32F). Int4
// weights: the fused-dequantization GEMV for small batches (decode), else dequantize to fp16 once per call and GEMM.
//
// cuBLAS is column-major. Our row-major W [out, in] is column-major Wᵀ with ld = in, x [rows, in] is column-major
// [in, rows], and y [rows, out] is column-major [out, rows], so y = x·Wᵀ is C = op_T(W) · X with m = out, n = rows,
// k = in.
#include <cstdint>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

cudaDataType_t cuda_type(DType t) { return t == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F; }

void gemm_16bit(cublasHandle_t h, const void* w, const void* x, cudaDataType_t type, int64_t out, int64_t rows,
                int64_t in, float* y) {
  const float alpha = 1.0f, beta = 0.0f;
  check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(out), int(rows), int(in), &alpha, w, type, int(in), x,
                            type, int(in), &beta, y, CUDA_R_32F, int(out), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx (matmul)");
}

}  // namespace

void CudaBackend::dense_matmul(const float* x, int64_t rows, const DenseWeight& w, float* y) {
  const void* wp = w.storage->cdata();
  if (w.dtype == DType::F32) {
    const float alpha = 1.0f, beta = 0.0f;
    check_cublas(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(w.out), int(rows), int(w.in), &alpha,
                             static_cast<const float*>(wp), int(w.in), x, int(w.in), &beta, y, int(w.out)),
                 "cublasSgemm (matmul)");
    return;
  }
  void* xc = scratch(0, size_t(rows * w.in) * 2);
  launch_cast_f32(stream_, x, rows * w.in, w.dtype, xc);
  gemm_16bit(cublas_, wp, xc, cuda_type(w.dtype), w.out, rows, w.in, y);
}

void CudaBackend::int4_matmul(const float* x, int64_t rows, const Int4Weight& w, float* y) {
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;  // the GEMV reads x as float4
  if (rows <= kInt4GemvMaxRows && w.gemv_ok() && aligned) {
    launch_int4_gemv(stream_, x, rows, w, y);
    return;
  }
  // Prefill-sized batches are compute-bound: one dequantization per call is amortized over the rows.
  void* wf = scratch(1, size_t(w.out * w.in) * 2);
  launch_int4_dequant_f16(stream_, w, wf);
  void* xc = scratch(0, size_t(rows * w.in) * 2);
  launch_cast_f32(stream_, x, rows * w.in, DType::F16, xc);
  gemm_16bit(cublas_, wf, xc, CUDA_R_16F, w.out, rows, w.in, y);
}

void CudaBackend::matmul(const float* x, int64_t rows, const LinearWeight& w, float* y) {
  if (rows == 0) return;
  if (const auto* q = dynamic_cast<const Int4Weight*>(&w)) return int4_matmul(x, rows, *q, y);
  dense_matmul(x, rows, static_cast<const DenseWeight&>(w), y);
}

void CudaBackend::logits(const float* x, int64_t dim, std::span<const int32_t> rows, const LinearWeight& head,
                         float* out) {
  if (rows.empty()) return;
  const int32_t* d_rows = stage(0, rows);
  auto* gathered = static_cast<float*>(scratch(2, rows.size() * size_t(dim) * sizeof(float)));
  launch_gather_rows(stream_, x, dim, d_rows, int64_t(rows.size()), gathered);
  matmul(gathered, int64_t(rows.size()), head, out);
}

}  // namespace kiln::cuda
