// The AWQ search's kernels on the CUDA backend (runtime/backend/awq_ops.h; docs/cuda.md, "AWQ search").
//
//  - gram_add: cuBLAS SSYRK of the call's rows (fp32, default math mode: no TF32), downloaded and added to the
//    host's double triangle, the same contract as the CPU (fp32 within a call, double across calls).
//  - the losses: W and G stay on the device for all the candidates of one linear; D = W - W', D·G by SGEMM (fp32,
//    no TF32), then Σ D ∘ (D·G) in double, in a fixed order (per-block partial sums, added on the host in order), so
//    two runs give the same bits.
//  - the int4 round trip (scale candidates, clipping): one warp per (row, group), the rule of
//    runtime/core/int4_grid.h spelled for the device below (int4_grid_of).
//  - the clipping search: one warp per (row, group) tries every threshold; the group's error dᵀ B d in double.
//
// Everything is enqueued on the backend's stream; host arguments are copied in (pageable copies return once staged),
// results are copied out and the stream synchronized before the op returns.
#include <cuda_fp16.h>

#include <cfloat>
#include <vector>

#include "runtime/cuda/cuda_backend.cuh"

namespace kiln::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;  // the per-group kernels: one warp per (row, group), 4 warps per block
constexpr int kSumBlocks = 256;    // the loss reduction: a fixed number of partial sums (a fixed order)
constexpr int kSumThreads = 256;

// Error flags the per-group kernels raise (the host turns them into one kiln::Error naming the tensor).
constexpr int kNonFinite = 1, kScaleOverflow = 2;

// ---- the int4 grid of one group, as runtime/core/int4_grid.cpp computes it on the host.
struct GroupGrid {
  float scale = 0.0f;  // the fp16 scale as fp32 (0: the group dequantizes to 0)
  float zero = 0.0f;   // the integer zero point, in [0, 15]
};

// lo = min(group, 0), hi = max(group, 0) over the warp's group. scale = fp16((hi - lo) / 15) (fp32 division, one
// rounding to fp16, nearest-even), zero = clamp(-round(lo / scale), 0, 15) (round half to even: rintf).
__device__ GroupGrid int4_grid_of(float lo, float hi, int* flags) {
  const float scale_f32 = __fdiv_rn(__fsub_rn(hi, lo), 15.0f);
  if (scale_f32 >= 65520.0f && scale_f32 <= FLT_MAX) atomicOr(flags, kScaleOverflow);  // f16_overflows()
  GroupGrid g;
  g.scale = __half2float(__float2half_rn(scale_f32));
  if (g.scale != 0.0f) g.zero = fminf(fmaxf(-rintf(__fdiv_rn(lo, g.scale)), 0.0f), 15.0f);
  return g;
}

// w quantized to the grid and dequantized: (clamp(round(w / scale) + zero, 0, 15) - zero) * scale. The explicit _rn
// intrinsics keep the compiler from fusing into FMAs, which would round differently from the CPU.
__device__ float int4_round_trip(float w, const GroupGrid& g) {
  if (g.scale == 0.0f) return 0.0f;
  const float q = fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, g.scale)), g.zero), 0.0f), 15.0f);
  return __fmul_rn(__fsub_rn(q, g.zero), g.scale);
}

__device__ float warp_min(float v) {
  for (int off = 16; off > 0; off /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ float warp_max(float v) {
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
// A butterfly sum: every lane ends with the same bits (a + b == b + a in IEEE arithmetic).
__device__ double warp_sum(double v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The grid of the warp's group of `gs` values v(c), c = lane, lane + 32, ...; raises kNonFinite for a NaN or inf.
template <class Value>
__device__ GroupGrid warp_group_grid(int64_t gs, Value v, int* flags) {
  const int lane = threadIdx.x % 32;
  float lo = 0.0f, hi = 0.0f;
  bool finite = true;
  for (int64_t c = lane; c < gs; c += 32) {
    const float x = v(c);
    finite = finite && isfinite(x);
    lo = fminf(lo, x);
    hi = fmaxf(hi, x);
  }
  if (__any_sync(0xffffffffu, !finite) && lane == 0) atomicOr(flags, kNonFinite);
  return int4_grid_of(warp_min(lo), warp_max(hi), flags);
}

// w_eff = RTN(w diag(s)) diag(1/s), w and w_eff [rows, in]; warp k handles row k % rows of group k / rows.
__global__ void scaled_rtn_kernel(const float* w, const float* s, int64_t rows, int64_t in, int64_t gs, float* w_eff,
                                  int* flags) {
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= rows * (in / gs)) return;  // whole warps exit together: the shuffles stay full-warp
  const int64_t r = warp % rows, g = warp / rows, c0 = g * gs;
  const float* wr = w + r * in + c0;
  const float* sg = s + c0;
  const GroupGrid grid = warp_group_grid(
      gs, [&](int64_t c) { return __fmul_rn(wr[c], sg[c]); }, flags);
  for (int64_t c = threadIdx.x % 32; c < gs; c += 32)
    w_eff[r * in + c0 + c] = __fdiv_rn(int4_round_trip(__fmul_rn(wr[c], sg[c]), grid), sg[c]);
}

// The clipping search: warp k searches row k % rows of group g = k / rows (the warps of one group are neighbours,
// so they share its Gram block B [gs, gs] in the caches). `d` is the warp's gs floats of shared memory.
__global__ void clip_search_kernel(const float* w, int64_t rows, int64_t in, int64_t gs, const float* blocks,
                                   int64_t grid, int64_t steps, float* clip, int* flags) {
  extern __shared__ float shared[];
  const int64_t warp = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (warp >= rows * (in / gs)) return;
  const int lane = threadIdx.x % 32;
  const int64_t r = warp % rows, g = warp / rows, groups = in / gs;
  const float* wg = w + r * in + g * gs;
  const float* B = blocks + g * gs * gs;
  float* d = shared + (threadIdx.x / 32) * gs;

  float amax = 0.0f;
  for (int64_t c = lane; c < gs; c += 32) amax = fmaxf(amax, fabsf(wg[c]));
  amax = warp_max(amax);
  float best_m = amax;
  double best_err = INFINITY;
  for (int64_t i = 0; i < steps && amax > 0.0f; ++i) {
    const float m = float(double(amax) * (1.0 - double(i) / double(grid)));
    auto clamped = [&](int64_t c) { return fminf(fmaxf(wg[c], -m), m); };
    const GroupGrid q = warp_group_grid(gs, clamped, flags);
    // d = w - RTN(clamp(w, -m, m)): the error against the unclipped weights.
    for (int64_t c = lane; c < gs; c += 32) d[c] = __fsub_rn(wg[c], int4_round_trip(clamped(c), q));
    __syncwarp();
    // dᵀ B d = Σ_a d[a] Σ_b B[a][b] d[b]: the lanes split each row's columns, so a warp reads a row contiguously.
    double err = 0;
    for (int64_t a = 0; a < gs; ++a) {
      double row = 0;
      for (int64_t b = lane; b < gs; b += 32) row += double(B[a * gs + b]) * double(d[b]);
      err += double(d[a]) * row;
    }
    err = warp_sum(err);
    __syncwarp();          // every lane has read d before the next threshold overwrites it
    if (err < best_err) {  // the same on every lane (warp_sum): the warp stays converged
      best_err = err;
      best_m = m;
    }
  }
  if (lane == 0) clip[r * groups + g] = best_m;
}

// d = a - b over n floats.
__global__ void difference_kernel(const float* a, const float* b, int64_t n, float* d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = __fsub_rn(a[i], b[i]);
}

// partial[block] = Σ double(x[i]) * double(y[i]) over the block's grid-stride share, summed in a fixed tree.
__global__ void dot_partials_kernel(const float* x, const float* y, int64_t n, double* partial) {
  __shared__ double sum[kSumThreads];
  double acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += double(x[i]) * double(y[i]);
  sum[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) sum[threadIdx.x] += sum[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sum[0];
}

// Device memory from the backend's pool, grown on demand, returned when the owner goes.
class DeviceArray {
 public:
  explicit DeviceArray(CudaBackend& be) : be_(be) {}
  ~DeviceArray() { be_.pool_free(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  template <class T>
  T* get(int64_t count) {
    const size_t bytes = std::max<size_t>(size_t(count) * sizeof(T), 1);
    if (bytes > bytes_) {
      be_.pool_free(ptr_);
      ptr_ = nullptr;
      ptr_ = be_.pool_alloc(bytes);
      bytes_ = bytes;
    }
    return static_cast<T*>(ptr_);
  }
  // What the last get() sized.
  template <class T>
  T* data() const {
    return static_cast<T*>(ptr_);
  }

 private:
  CudaBackend& be_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct CudaLinearTarget : AwqLinearTarget {
  explicit CudaLinearTarget(CudaBackend& be) : w(be), gram(be) {}
  DeviceArray w, gram;  // W [out, in], G [in, in] fp32
  int64_t rows = 0, cols = 0;
  int64_t out() const override { return rows; }
  int64_t in() const override { return cols; }
};

class CudaAwqOps : public AwqOps {
 public:
  explicit CudaAwqOps(CudaBackend& be)
      : be_(be), s_(be.stream()), x_(be), gram_(be), a_(be), b_(be), c_(be), s_dev_(be), partial_(be), flags_(be) {}

  void gram_add(const float* x, int64_t n, int64_t dim, double* upper) override {
    if (n <= 0) return;
    float* dx = x_.get<float>(n * dim);
    float* dg = gram_.get<float>(dim * dim);
    upload(dx, x, n * dim);
    // Column-major, x [n, dim] row-major is Xᵀ [dim, n] (ld dim), and SSYRK gives C = Xᵀ X [dim, dim]. Its column-major
    // lower triangle (row j >= column i) is, read row-major, the upper triangle we keep: dg[i * dim + j], j >= i.
    const float one = 1.0f, zero = 0.0f;
    check_cublas(cublasSsyrk(be_.cublas(), CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, int(dim), int(n), &one, dx, int(dim),
                             &zero, dg, int(dim)),
                 "cublasSsyrk (awq gram)");
    std::vector<float> g(static_cast<size_t>(dim * dim));
    download(g.data(), dg, dim * dim);
    for (int64_t i = 0; i < dim; ++i) {
      double* dst = upper + (i * dim - i * (i - 1) / 2);
      const float* src = g.data() + i * dim + i;
      for (int64_t c = 0; c < dim - i; ++c) dst[c] += double(src[c]);
    }
  }

  std::unique_ptr<AwqLinearTarget> linear_target(const float* w, int64_t out, int64_t in,
                                                 const std::function<void(int64_t, float*)>& gram_row) override {
    auto t = std::make_unique<CudaLinearTarget>(be_);
    t->rows = out;
    t->cols = in;
    upload(t->w.get<float>(out * in), w, out * in);
    // G row by row through a host chunk of rows (no host copy of the whole fp32 matrix).
    float* dg = t->gram.get<float>(in * in);
    const int64_t chunk = std::min<int64_t>(in, 256);
    std::vector<float> rows(static_cast<size_t>(chunk * in));
    for (int64_t i0 = 0; i0 < in; i0 += chunk) {
      const int64_t m = std::min(chunk, in - i0);
      for (int64_t i = 0; i < m; ++i) gram_row(i0 + i, rows.data() + i * in);
      upload(dg + i0 * in, rows.data(), m * in);
    }
    return t;
  }

  double linear_loss(const AwqLinearTarget& target, const float* w_quant) override {
    const auto& t = static_cast<const CudaLinearTarget&>(target);
    float* wq = a_.get<float>(t.rows * t.cols);
    upload(wq, w_quant, t.rows * t.cols);
    return loss_on_device(t, wq);
  }

  double scaled_rtn_loss(AwqLinearTarget& target, const float* s, int64_t group_size,
                         const std::string& label) override {
    auto& t = static_cast<CudaLinearTarget&>(target);
    float* wq = a_.get<float>(t.rows * t.cols);
    launch_scaled_rtn(t.w.data<float>(), s, t.rows, t.cols, group_size, wq);
    check_flags(label);
    return loss_on_device(t, wq);
  }

  void scaled_rtn(const float* w, const float* s, int64_t out, int64_t in, int64_t group_size, const std::string& label,
                  float* w_eff) override {
    float* dw = b_.get<float>(out * in);
    float* dq = a_.get<float>(out * in);
    upload(dw, w, out * in);
    launch_scaled_rtn(dw, s, out, in, group_size, dq);
    download(w_eff, dq, out * in);
    check_flags(label);
  }

  void clip_search(const float* w, int64_t rows, int64_t in, int64_t row0, int64_t gs, const float* blocks,
                   int64_t grid, int64_t steps, const std::string& label, float* clip) override {
    const int64_t groups = in / gs, warps = rows * groups;
    if (warps == 0) return;
    float* dw = b_.get<float>(rows * in);
    float* dblocks = c_.get<float>(groups * gs * gs);
    float* dclip = a_.get<float>(warps);
    upload(dw, w, rows * in);
    upload(dblocks, blocks, groups * gs * gs);
    int* flags = reset_flags();
    const size_t shared = size_t(kWarpsPerBlock * gs) * sizeof(float);
    if (shared > 48 * 1024)
      throw Error("cuda: the AWQ clipping search takes groups of at most 3072 inputs, not " + std::to_string(gs));
    clip_search_kernel<<<blocks_for(warps, kWarpsPerBlock), kWarpsPerBlock * 32, shared, s_>>>(
        dw, rows, in, gs, dblocks, grid, steps, dclip, flags);
    check_launch("clip_search_kernel");
    download(clip, dclip, warps);
    check_flags(label + " (rows from " + std::to_string(row0) + ")");
  }

 private:
  CudaBackend& be_;
  cudaStream_t s_;
  DeviceArray x_, gram_, a_, b_, c_, s_dev_, partial_, flags_;

  void upload(float* dst, const float* src, int64_t n) {
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(float), cudaMemcpyHostToDevice, s_), "cudaMemcpyAsync (awq)");
  }
  template <class T>
  void download(T* dst, const T* src, int64_t n) {
    check(cudaMemcpyAsync(dst, src, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost, s_), "cudaMemcpyAsync (awq)");
    check(cudaStreamSynchronize(s_), "cudaStreamSynchronize (awq)");
  }

  int* reset_flags() {
    int* f = flags_.get<int>(1);
    check(cudaMemsetAsync(f, 0, sizeof(int), s_), "cudaMemsetAsync (awq flags)");
    return f;
  }
  // After a download (the stream is idle): one error naming the tensor when a kernel raised a flag.
  void check_flags(const std::string& label) {
    int f = 0;
    download(&f, flags_.data<int>(), 1);
    if (f & kNonFinite) throw Error("tensor '" + label + "' holds a non-finite value");
    if (f & kScaleOverflow) throw Error("tensor '" + label + "' has a group whose int4 scale exceeds fp16");
  }

  void launch_scaled_rtn(const float* dw, const float* s, int64_t out, int64_t in, int64_t gs, float* dq) {
    float* ds = s_dev_.get<float>(in);
    upload(ds, s, in);
    int* flags = reset_flags();
    const int64_t warps = out * (in / gs);
    scaled_rtn_kernel<<<blocks_for(warps, kWarpsPerBlock), kWarpsPerBlock * 32, 0, s_>>>(dw, ds, out, in, gs, dq,
                                                                                         flags);
    check_launch("scaled_rtn_kernel");
  }

  // trace(D G Dᵀ), D = W - W' (wq on the device).
  double loss_on_device(const CudaLinearTarget& t, const float* wq) {
    const int64_t out = t.rows, in = t.cols, n = out * in;
    float* d = b_.get<float>(n);
    float* dg = c_.get<float>(n);
    difference_kernel<<<std::min<unsigned>(blocks_for(n, 256), 65535), 256, 0, s_>>>(t.w.data<float>(), wq, n, d);
    check_launch("difference_kernel");
    // Row-major D [out, in] is column-major Dᵀ [in, out]; (D G)ᵀ = G Dᵀ (G symmetric), column-major [in, out], which
    // read row-major is D G [out, in].
    const float one = 1.0f, zero = 0.0f;
    check_cublas(cublasSgemm(be_.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, int(in), int(out), int(in), &one,
                             t.gram.data<float>(), int(in), d, int(in), &zero, dg, int(in)),
                 "cublasSgemm (awq loss)");
    double* partial = partial_.get<double>(kSumBlocks);
    dot_partials_kernel<<<kSumBlocks, kSumThreads, 0, s_>>>(d, dg, n, partial);
    check_launch("dot_partials_kernel");
    std::vector<double> host(kSumBlocks);
    download(host.data(), partial, kSumBlocks);
    double total = 0;
    for (double p : host) total += p;
    return total;
  }
};

}  // namespace

std::unique_ptr<AwqOps> CudaBackend::make_awq_ops() { return std::make_unique<CudaAwqOps>(*this); }

}  // namespace kiln::cuda
