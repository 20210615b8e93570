#include "runtime/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/core/devices.h"
#include "runtime/core/dtype_convert.h"
#include "runtime/core/error.h"
#include "runtime/cpu/activation.h"
#include "runtime/cpu/huge_pages.h"
#include "runtime/cpu/matmul_int4.h"
#include "runtime/cpu/matmul_int8.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/kv_int8.h"

namespace kiln {

std::unique_ptr<Backend> make_cpu_backend(unsigned threads) {
  if (threads == 0) {
    if (const char* env = std::getenv("KILN_THREADS"))
      threads = unsigned(std::max(1, std::atoi(env)));
    else
      threads = cpu_features().threads;
  }
  return std::make_unique<cpu::CpuBackend>(threads);
}

namespace cpu {

void HostBuffer::Free::operator()(void* p) const {
  if (huge_bytes)
    cpu::unmap_huge(p, huge_bytes);
  else
    std::free(p);
}

HostBuffer::HostBuffer(size_t bytes) : bytes_(bytes) {
  // 64-byte alignment: full cache lines and aligned AVX-512 loads. From 2 MB (the KV cache), huge pages
  // (huge_pages.h): attention reads each sequence's blocks wherever they lie.
  size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = nullptr;
  if (rounded >= cpu::kHugePage && cpu::huge_pages_in_use()) {
    try {
      p = cpu::map_huge(rounded);
    } catch (const std::bad_alloc&) {
      throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
    }
    data_ = std::unique_ptr<void, Free>(p, Free{rounded});
  } else {
    p = std::aligned_alloc(64, rounded);
    if (!p) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
    data_.reset(p);
  }
  std::memset(p, 0, rounded);  // zero already; touched now so that its pages are not first faulted in mid-step
}

CpuBackend::CpuBackend(unsigned threads, MatmulIsa isa) : pool_(threads), isa_(isa) {}

std::string CpuBackend::name() const {
  return std::string("cpu (") + matmul_isa_name(isa_) + ", " + std::to_string(pool_.size()) + " threads)";
}

std::unique_ptr<Buffer> CpuBackend::alloc(size_t bytes) { return std::make_unique<HostBuffer>(bytes); }

void CpuBackend::upload(Buffer& dst, size_t offset, const void* src, size_t bytes) {
  std::memcpy(static_cast<uint8_t*>(dst.data()) + offset, src, bytes);
}

void CpuBackend::download(const Buffer& src, size_t offset, void* dst, size_t bytes) {
  std::memcpy(dst, static_cast<const uint8_t*>(const_cast<Buffer&>(src).data()) + offset, bytes);
}

std::unique_ptr<LinearWeight> CpuBackend::pack_linear(const void* data, DType dtype, int64_t out, int64_t in) {
  return std::make_unique<PackedLinear>(cpu::pack_linear(data, dtype, out, in, best_dense_layout(isa_, dtype)));
}

std::unique_ptr<LinearWeight> CpuBackend::pack_linear_int4(const Int4WeightView& w) {
  return std::make_unique<Int4Linear>(cpu::pack_linear_int4(w, cpu::best_int4_layout(isa_)));
}

std::unique_ptr<LinearWeight> CpuBackend::pack_linear_int8(const Int8WeightView& w) {
  return std::make_unique<cpu::Int8Linear>(cpu::pack_linear_int8(w));
}

std::unique_ptr<EmbeddingTable> CpuBackend::load_embedding(const void* data, DType dtype, int64_t rows, int64_t dim) {
  if (dtype != DType::F32 && dtype != DType::F16 && dtype != DType::BF16)
    throw Error("embedding table must be fp32, fp16 or bf16, not " + std::string(dtype_name(dtype)));
  auto t = std::make_unique<HostEmbedding>();
  t->n = rows;
  t->d = dim;
  t->dtype = dtype;
  const auto* p = static_cast<const uint8_t*>(data);
  t->data.assign(p, p + size_t(rows * dim) * dtype_size(dtype));
  return t;
}

std::unique_ptr<LinearWeight> CpuBackend::pack_tied_head(const EmbeddingTable& table) {
  const auto& t = static_cast<const HostEmbedding&>(table);
  return pack_linear(t.data.data(), t.dtype, t.n, t.d);
}

namespace {
// The norms' and RoPE's rows are compiled for AVX-512 and AVX2 besides the baseline (function multiversioning: the
// loader picks one per CPU); at SSE2 the norms were 2-2.5% of a batch-32 decode step. The clones compute the baseline's
// values: every float operation goes lane by lane in the same order, and this file is compiled without FMA contraction
// (runtime/CMakeLists.txt).
#if defined(__x86_64__) && defined(__GNUC__)
#define KILN_ROW_CLONES [[gnu::target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")]]
#else
#define KILN_ROW_CLONES
#endif

// Σ f(x[i]) in double over 16 interleaved partial sums, added in a fixed order at the end. One running double sum is
// a chain of dependent adds (~4 cycles per element); 16 independent ones are two chains of 8 doubles at AVX-512. Any
// order of double sums rounds to the same float in practice, and this order is fixed, so every batch size, thread
// count and ISA gets the same bits (batch invariance).
template <class F>
inline double sum16(const float* x, int64_t dim, F f) {
  double s[16] = {};
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16)
    for (int j = 0; j < 16; ++j) s[j] += f(x[i + j]);
  for (; i < dim; ++i) s[i % 16] += f(x[i]);
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// x += r, the residual add before a norm (row by row, so the norm reads the row while it is in cache).
KILN_ROW_CLONES void add_row(float* x, const float* r, int64_t dim) {
  for (int64_t i = 0; i < dim; ++i) x[i] += r[i];
}

// One RMSNorm row, as transformers computes it in fp32: x * rsqrt(mean(x^2) + eps) * w.
KILN_ROW_CLONES void rms_norm_row(const float* x, const float* w, float* y, int64_t dim, float eps) {
  const double ss = sum16(x, dim, [](float v) { return double(v) * v; });
  const float inv = 1.0f / std::sqrt(float(ss / double(dim)) + eps);
  for (int64_t i = 0; i < dim; ++i) y[i] = w[i] * (x[i] * inv);
}

// One LayerNorm row, as torch computes it in fp32: biased variance, (x - mean) * rsqrt(var + eps) * w + b. The sums
// are taken in double so that the result does not depend on the order (or the row's length) in any visible way.
KILN_ROW_CLONES void layer_norm_row(const float* x, const float* w, const float* b, float* y, int64_t dim, float eps) {
  const float mean = float(sum16(x, dim, [](float v) { return double(v); }) / double(dim));
  const double ss = sum16(x, dim, [mean](float v) { return double(v - mean) * double(v - mean); });
  const float inv = 1.0f / std::sqrt(float(ss / double(dim)) + eps);
  for (int64_t i = 0; i < dim; ++i) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

// One head's RoPE: element a(i) = p[i * a_step] and its partner p[i * a_step + c_off] rotate by angle i.
KILN_ROW_CLONES void rotate_head(float* p, const float* cos, const float* sin, int64_t half, int64_t a_step,
                                 int64_t c_off) {
  for (int64_t i = 0; i < half; ++i) {
    float* pa = p + i * a_step;
    const float a = pa[0], c = pa[c_off];
    pa[0] = a * cos[i] - c * sin[i];
    pa[c_off] = c * cos[i] + a * sin[i];
  }
}

// GELU as torch computes it in fp32: exact x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt 2)), or the tanh approximation
// 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))).
inline float gelu_value(float x, bool tanh_form) {
  if (!tanh_form) return 0.5f * x * (1.0f + std::erf(x * float(M_SQRT1_2)));
  const float k = float(M_2_SQRTPI * M_SQRT1_2);  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x)));
}
}  // namespace

void CpuBackend::embedding(const EmbeddingTable& table, std::span<const int32_t> ids, float* out) {
  const auto& t = static_cast<const HostEmbedding&>(table);
  for (size_t r = 0; r < ids.size(); ++r) {
    if (ids[r] < 0 || ids[r] >= t.n)
      throw Error("token id " + std::to_string(ids[r]) + " is outside the vocabulary (0.." + std::to_string(t.n - 1) +
                  ")");
    const size_t row = size_t(ids[r]) * size_t(t.d) * dtype_size(t.dtype);
    convert_to_f32(t.dtype, t.data.data() + row, out + r * t.d, size_t(t.d));
  }
}

void CpuBackend::rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t dim, float eps) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) rms_norm_row(x + r * dim, w, y + r * dim, dim, eps);
  });
}

void CpuBackend::add_rms_norm(float* x, const float* r, const float* w, float* y, int64_t rows, int64_t dim,
                              float eps) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      add_row(x + row * dim, r + row * dim, dim);
      rms_norm_row(x + row * dim, w, y + row * dim, dim, eps);
    }
  });
}

void CpuBackend::layer_norm(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t dim,
                            float eps) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) layer_norm_row(x + r * dim, w, bias, y + r * dim, dim, eps);
  });
}

void CpuBackend::add_layer_norm(float* x, const float* r, const float* w, const float* bias, float* y, int64_t rows,
                                int64_t dim, float eps) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      add_row(x + row * dim, r + row * dim, dim);
      layer_norm_row(x + row * dim, w, bias, y + row * dim, dim, eps);
    }
  });
}

void CpuBackend::head_rms_norm(float* x, int64_t rows, int64_t row_stride, int64_t num_heads, int64_t head_dim,
                               const float* w, float eps) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t h = 0; h < num_heads; ++h) {
        float* p = x + r * row_stride + h * head_dim;
        rms_norm_row(p, w, p, head_dim, eps);
      }
  });
}

void CpuBackend::matmul(const float* x, int64_t rows, const LinearWeight& w, float* y) {
  // Int4 weights (quantized workspaces) take the fused-dequantization kernel; everything else is dense.
  if (const auto* q = dynamic_cast<const Int4Linear*>(&w)) return cpu::matmul_int4(pool_, isa_, x, rows, *q, y);
  if (const auto* h = dynamic_cast<const cpu::Int8Linear*>(&w)) return cpu::matmul_int8(pool_, isa_, x, rows, *h, y);
  cpu::matmul(pool_, isa_, x, rows, static_cast<const PackedLinear&>(w), y);
}

void CpuBackend::add_bias(float* y, const float* b, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) y[r * dim + i] += b[i];
}

void CpuBackend::rope(float* x, int64_t rows, int64_t row_stride, int64_t num_heads, const RopeLayout& layout,
                      std::span<const int32_t> positions, std::span<const int32_t> seq_of_row,
                      std::span<const float> inv_freq) {
  const int64_t half = layout.rotary_dim / 2, hd = layout.head_dim;
  // Element i of a pair is at a(i), its partner at c(i): (i, i + half) rotate-half, (2i, 2i + 1) interleaved.
  const int64_t a_step = layout.interleaved ? 2 : 1, c_off = layout.interleaved ? 1 : half;
  RopeAngles& t = rope_angles_;
  const bool known = t.half == half && std::ranges::equal(t.positions, positions.first(size_t(rows))) &&
                     std::ranges::equal(t.seq_of_row, seq_of_row.first(size_t(rows))) &&
                     std::ranges::equal(t.inv_freq, inv_freq);
  if (!known) {
    t.half = half;
    t.positions.assign(positions.begin(), positions.begin() + rows);
    t.seq_of_row.assign(seq_of_row.begin(), seq_of_row.begin() + rows);
    t.inv_freq.assign(inv_freq.begin(), inv_freq.end());
    t.cos.resize(size_t(rows * half));
    t.sin.resize(size_t(rows * half));
  }
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float *cos_r = t.cos.data() + r * half, *sin_r = t.sin.data() + r * half;
      if (!known) {
        const float* f = inv_freq.data() + size_t(seq_of_row[r]) * size_t(half);
        for (int64_t i = 0; i < half; ++i) {
          // The angle is an fp32 product, as in transformers (position.float() * inv_freq).
          const float angle = float(positions[r]) * f[i];
          cos_r[i] = float(std::cos(double(angle)));
          sin_r[i] = float(std::sin(double(angle)));
        }
      }
      for (int64_t h = 0; h < num_heads; ++h)
        rotate_head(x + r * row_stride + h * hd, cos_r, sin_r, half, a_step, c_off);
    }
  });
}

void CpuBackend::kv_write(KvCache& cache, int64_t layer, const float* k, const float* v, int64_t rows,
                          int64_t row_stride, std::span<const int64_t> slots) {
  const auto& c = cache.config();
  const KvDType dt = c.dtype;
  const size_t rb = kv_row_bytes(dt, c.head_dim);  // one (token, kv head) row
  // One (token, kv head) row of src into the cache at `slot`: int8 rows are quantized per row
  // (runtime/kv/kv_int8.h).
  auto store = [&](uint8_t* base, const float* src, int64_t slot, const std::vector<float>& scales, int64_t h) {
    const int64_t block = slot / c.block_size, off = slot % c.block_size;
    uint8_t* dst = base + size_t((block * c.num_kv_heads + h) * c.block_size + off) * rb;
    const size_t n = size_t(c.head_dim);
    switch (dt) {
      case KvDType::F32:
        std::memcpy(dst, src, 4 * n);
        break;
      case KvDType::BF16:
        convert_f32_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
        break;
      case KvDType::F16:  // out-of-range values become +-inf, as in torch's fp16 cache
        for (size_t i = 0; i < n; ++i) reinterpret_cast<uint16_t*>(dst)[i] = f32_to_f16(src[i]);
        break;
      case KvDType::I8Online:
        kv_quantize_online(src, c.head_dim, dst);
        break;
      case KvDType::I8Static:
        kv_quantize_static(src, c.head_dim, scales[size_t(layer * c.num_kv_heads + h)], reinterpret_cast<int8_t*>(dst));
        break;
    }
  };
  auto* kb = static_cast<uint8_t*>(cache.keys(layer));
  auto* vb = static_cast<uint8_t*>(cache.values(layer));
  // In parallel: rows go to distinct slots, and a batched step's first writes to a block fault its pages in.
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t h = 0; h < c.num_kv_heads; ++h) {
        store(kb, k + r * row_stride + h * c.head_dim, slots[r], c.k_scale, h);
        store(vb, v + r * row_stride + h * c.head_dim, slots[r], c.v_scale, h);
      }
  });
}

void CpuBackend::silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gate_up + r * 2 * inter;
      if (isa_ != MatmulIsa::Scalar) {
        (isa_ == MatmulIsa::Avx512 ? silu_mul_avx512 : silu_mul_avx2)(g, g + inter, out + r * inter, inter);
        continue;
      }
      for (int64_t i = 0; i < inter; ++i) out[r * inter + i] = g[i] / (1.0f + std::exp(-g[i])) * g[inter + i];
    }
  });
}

void CpuBackend::gelu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter, bool tanh_form) {
  pool_.parallel_for(rows, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* g = gate_up + r * 2 * inter;
      for (int64_t i = 0; i < inter; ++i) out[r * inter + i] = gelu_value(g[i], tanh_form) * g[inter + i];
    }
  });
}

void CpuBackend::gelu(const float* x, float* y, int64_t n, bool tanh_form) {
  pool_.parallel_for(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = gelu_value(x[i], tanh_form);
  });
}

void CpuBackend::add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void CpuBackend::scale(float* y, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= s;
}

void CpuBackend::softcap(float* y, int64_t n, float cap) {
  pool_.parallel_for(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = cap * std::tanh(y[i] / cap);
  });
}

void CpuBackend::logits(const float* x, int64_t dim, std::span<const int32_t> rows, const LinearWeight& head,
                        float* out) {
  // Decode asks for every row of the batch, in order: no copy then.
  bool all = true;
  for (size_t i = 0; i < rows.size() && all; ++i) all = rows[i] == int32_t(i);
  if (all) return matmul(x, int64_t(rows.size()), head, out);
  std::vector<float> gathered(rows.size() * size_t(dim));
  for (size_t i = 0; i < rows.size(); ++i)
    std::memcpy(&gathered[i * size_t(dim)], x + int64_t(rows[i]) * dim, size_t(dim) * sizeof(float));
  matmul(gathered.data(), int64_t(rows.size()), head, out);
}

}  // namespace cpu
}  // namespace kiln
