// The CUDA backend's device, stream, memory pool and host<->device copies. Ops live in the other cuda_*.cu files.
#include <cstdint>
#include <cstdio>

#include "runtime/core/devices.h"
#include "runtime/cuda/cuda_backend.cuh"

namespace kiln {

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    throw Error(std::string("the cuda device is not available: ") +
                (e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device found"));
  if (device < 0 || device >= n)
    throw Error("cuda device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " found)");
  return std::make_unique<cuda::CudaBackend>(device);
}

namespace cuda {

namespace {
std::string mib(size_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }
}  // namespace

DeviceBuffer::DeviceBuffer(CudaBackend& owner, size_t bytes) : owner_(owner), bytes_(bytes) {
  ptr_ = owner.pool_alloc(std::max<size_t>(bytes, 1));
  check(cudaMemsetAsync(ptr_, 0, std::max<size_t>(bytes, 1), owner.stream()), "cudaMemsetAsync (alloc)");
}

DeviceBuffer::~DeviceBuffer() { owner_.pool_free(ptr_); }

CudaBackend::CudaBackend(int device) : device_(device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  device_name_ =
      std::string(p.name) + ", sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " + mib(p.totalGlobalMem);
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaDeviceGetDefaultMemPool(&pool_, device), "cudaDeviceGetDefaultMemPool");
  // Keep freed memory in the pool: the KV cache and weights are allocated once, scratch regrows rarely.
  uint64_t keep = UINT64_MAX;
  check(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  check_cublas(cublasCreate(&cublas_), "cublasCreate");
  check_cublas(cublasSetStream(cublas_, stream_), "cublasSetStream");
  staging_.resize(10);  // 0-7: embedding, rope, logits, attention; 8-9: the MoE row lists (cuda_moe.cu)
  scratch_.resize(4);
}

CudaBackend::~CudaBackend() {
  // Destructors must not throw: errors here (a device already lost) are ignored.
  for (auto* v : {&staging_, &scratch_})
    for (Scratch& s : *v)
      if (s.ptr) cudaFreeAsync(s.ptr, stream_);
  cudaStreamSynchronize(stream_);
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::string CudaBackend::name() const { return "cuda (" + device_name_ + ")"; }

size_t CudaBackend::free_memory() const {
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  return free_b;
}

void* CudaBackend::pool_alloc(size_t bytes) {
  void* p = nullptr;
  cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, pool_, stream_);
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error state before asking for the numbers
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw Error("cuda: out of device memory: asked for " + mib(bytes) + ", " + mib(free_b) + " free of " +
                mib(total_b));
  }
  check(e, "cudaMallocFromPoolAsync");
  return p;
}

void CudaBackend::pool_free(void* p) {
  if (p) cudaFreeAsync(p, stream_);  // from a destructor: nothing to report to
}

void* CudaBackend::stage_bytes(int slot, const void* src, size_t bytes) {
  Scratch& s = staging_.at(size_t(slot));
  if (s.bytes < bytes) {
    if (s.ptr) pool_free(s.ptr);
    s.bytes = std::max<size_t>(bytes, 4096);
    s.ptr = pool_alloc(s.bytes);
  }
  // Pageable source: the call returns once the bytes are staged, so `src` may go away right after.
  if (bytes) check(cudaMemcpyAsync(s.ptr, src, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (stage)");
  return s.ptr;
}

void* CudaBackend::scratch(int slot, size_t bytes) {
  Scratch& s = scratch_.at(size_t(slot));
  if (s.bytes < bytes) {
    if (s.ptr) pool_free(s.ptr);
    s.bytes = bytes;
    s.ptr = pool_alloc(bytes);
  }
  return s.ptr;
}

std::unique_ptr<Buffer> CudaBackend::alloc(size_t bytes) { return std::make_unique<DeviceBuffer>(*this, bytes); }

void CudaBackend::upload(Buffer& dst, size_t offset, const void* src, size_t bytes) {
  if (offset + bytes > dst.bytes()) throw Error("cuda: upload past the end of a device buffer");
  check(cudaMemcpyAsync(static_cast<uint8_t*>(dst.data()) + offset, src, bytes, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync (upload)");
  check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (upload)");
}

void CudaBackend::download(const Buffer& src, size_t offset, void* dst, size_t bytes) {
  if (offset + bytes > src.bytes()) throw Error("cuda: download past the end of a device buffer");
  const auto* p = static_cast<const uint8_t*>(static_cast<const DeviceBuffer&>(src).cdata());
  check(cudaMemcpyAsync(dst, p + offset, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (download)");
  check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (download)");
}

}  // namespace cuda
}  // namespace kiln
