// The paged KV cache on the CUDA backend: kv_write stores K/V rows in exactly the byte format of docs/kv_cache.md
// (fp32/fp16/bf16 rows, int8-static codes, int8-online codes + (scale, min)), and attention reads them back through
// the block tables. One kernel serves prefill and decode: every (query row, head, key split) is a block of kWarps
// warps, each warp walks every kWarps-th key of the split with an online softmax (running max, sum and weighted V in
// registers), and the warps' partial results are merged at the end. Scores, softmax and sums are fp32.
// Key splits exist for decode: a batch of a few rows has too few (row, head) blocks to fill the GPU, so a long
// context is cut into splits of about kKeysPerSplit keys whose partial (max, sum, unnormalized output) a second kernel
// merges.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <vector>

#include "runtime/cuda/cuda_backend.cuh"
#include "runtime/kv/kv_cache.h"

namespace kiln::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int64_t kKeysPerSplit = 256;
constexpr int64_t kMaxSplits = 64;
// At or above this many (row, head) blocks the grid fills the GPU without splitting the keys.
constexpr int64_t kSplitBelowBlocks = 1024;
constexpr int kMaxHeadDim = 256;
constexpr int kPerLane = kMaxHeadDim / 32;

struct KvLayout {
  int64_t num_kv_heads = 0, block_size = 0, head_dim = 0, row_bytes = 0;
  KvDType dtype = KvDType::F32;
};

__device__ inline const uint8_t* kv_row(const uint8_t* base, const KvLayout& L, int64_t block, int64_t head,
                                        int64_t off) {
  return base + ((block * L.num_kv_heads + head) * L.block_size + off) * L.row_bytes;
}

// The dequantization of one int8 row, x = code * scale + offset: static rows use the (layer, kv head) scale and no
// offset; online rows carry (scale, min) after their codes, possibly unaligned (odd head_dim), so they are read
// bytewise, once per row rather than per element.
__device__ inline float2 kv_row_dequant(const uint8_t* row, const KvLayout& L, float static_scale) {
  if (L.dtype != KvDType::I8Online) return make_float2(static_scale, 0.0f);
  float s, lo;
  memcpy(&s, row + L.head_dim, 4);
  memcpy(&lo, row + L.head_dim + 4, 4);
  return make_float2(s, lo);
}

// Element i of a cache row as fp32 (`dq` from kv_row_dequant for the int8 dtypes).
__device__ inline float kv_load(const uint8_t* row, int64_t i, const KvLayout& L, float2 dq) {
  switch (L.dtype) {
    case KvDType::F32:
      return reinterpret_cast<const float*>(row)[i];
    case KvDType::F16:
      return __half2float(reinterpret_cast<const __half*>(row)[i]);
    case KvDType::BF16:
      return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[i]);
    case KvDType::I8Static:
      return float(reinterpret_cast<const int8_t*>(row)[i]) * dq.x;
    case KvDType::I8Online:
      return dq.y + float(row[i]) * dq.x;
  }
  return 0;
}

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_min(float v) {
  for (int o = 16; o > 0; o /= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One warp per (row, kv head, K or V): quantizes/converts one row as runtime/cpu/cpu_backend.cpp and
// runtime/kv/kv_int8.cpp do (rintf is round-half-even, as std::nearbyint; the divisions are IEEE).
__global__ void kv_write_kernel(uint8_t* kbase, uint8_t* vbase, const float* k, const float* v, int64_t row_stride,
                                const int64_t* slots, KvLayout L, const float* k_scale, const float* v_scale) {
  const int64_t r = blockIdx.x, h = blockIdx.y;
  const bool is_v = blockIdx.z == 1;
  const int lane = threadIdx.x;
  const float* src = (is_v ? v : k) + r * row_stride + h * L.head_dim;
  const int64_t slot = slots[r];
  uint8_t* dst = const_cast<uint8_t*>(kv_row(is_v ? vbase : kbase, L, slot / L.block_size, h, slot % L.block_size));
  const int64_t n = L.head_dim;
  switch (L.dtype) {
    case KvDType::F32:
      for (int64_t i = lane; i < n; i += 32) reinterpret_cast<float*>(dst)[i] = src[i];
      return;
    case KvDType::F16:
      for (int64_t i = lane; i < n; i += 32) reinterpret_cast<__half*>(dst)[i] = __float2half_rn(src[i]);
      return;
    case KvDType::BF16:
      for (int64_t i = lane; i < n; i += 32) reinterpret_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(src[i]);
      return;
    case KvDType::I8Static: {
      const float scale = (is_v ? v_scale : k_scale)[h];
      const float inv = scale > 0 ? 1.0f / scale : 0.0f;
      for (int64_t i = lane; i < n; i += 32)
        dst[i] = scale > 0 ? uint8_t(int8_t(fminf(fmaxf(rintf(src[i] * inv), -127.0f), 127.0f))) : 0;
      return;
    }
    case KvDType::I8Online: {
      float lo = src[0], hi = src[0];
      for (int64_t i = lane; i < n; i += 32) {
        lo = fminf(lo, src[i]);
        hi = fmaxf(hi, src[i]);
      }
      lo = warp_min(lo);
      hi = warp_max(hi);
      const float scale = (hi - lo) / 255.0f;
      const float inv = scale > 0 ? 1.0f / scale : 0.0f;
      for (int64_t i = lane; i < n; i += 32)
        dst[i] = scale > 0 ? uint8_t(fminf(fmaxf(rintf((src[i] - lo) * inv), 0.0f), 255.0f)) : 0;
      if (lane == 0) {
        memcpy(dst + n, &scale, 4);
        memcpy(dst + n + 4, &lo, 4);
      }
      return;
    }
  }
}

// Per query row: its row in q/out, its position, the offset of its sequence's block table in `tables`, and its last
// visible key (its position, or the end of a prefix LM's bidirectional prefix).
struct RowMeta {
  int32_t row, position, table_offset, last_key;
};

__global__ void __launch_bounds__(kWarps * 32)
    attention_kernel(const float* q, int64_t q_stride, const uint8_t* kbase, const uint8_t* vbase, KvLayout L,
                     const float* k_scale, const float* v_scale, const RowMeta* rows, const int32_t* tables,
                     int64_t num_heads, int64_t group, float score_scale, float softcap, int64_t window,
                     int64_t logn_length, float* out, int64_t keys_per_split, float* part_ml, float* part_acc) {
  const RowMeta meta = rows[blockIdx.x];
  const int64_t h = blockIdx.y, g = h / group, hd = L.head_dim, bs = L.block_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* table = tables + meta.table_offset;
  const float ks = k_scale ? k_scale[g] : 0.0f, vs = v_scale ? v_scale[g] : 0.0f;

  float qv[kPerLane], acc[kPerLane];
  const float* qh = q + int64_t(meta.row) * q_stride + h * hd;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    qv[t] = d < hd ? qh[d] : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const int64_t pos = meta.position;
  // Qwen's logn attention: the query of a position past logn_length is scaled (backend.h, logn_attention_factor).
  if (logn_length > 0 && pos + 1 > logn_length) score_scale *= float(log(double(pos + 1)) / log(double(logn_length)));
  const int64_t visible_from = window > 0 ? max(int64_t(0), pos - window + 1) : 0;
  // This block's keys: split blockIdx.z of the visible range (the whole range when there is one split).
  const int64_t first = visible_from + int64_t(blockIdx.z) * keys_per_split;
  const int64_t last_key = meta.last_key;
  const int64_t last = gridDim.z == 1 ? last_key : min(last_key, first + keys_per_split - 1);
  for (int64_t j = first + warp; j <= last; j += kWarps) {
    const int64_t block = table[j / bs], off = j % bs;
    const uint8_t* krow = kv_row(kbase, L, block, g, off);
    const float2 kdq = kv_row_dequant(krow, L, ks);
    float dot = 0.0f;
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) dot += qv[t] * kv_load(krow, d, L, kdq);
    }
    float score = warp_sum(dot) * score_scale;
    if (softcap > 0) score = softcap * tanhf(score / softcap);
    const float m_new = fmaxf(m, score);
    const float c = expf(m - m_new), p = expf(score - m_new);  // c = 0 on the first key (m = -inf)
    l = l * c + p;
    const uint8_t* vrow = kv_row(vbase, L, block, g, off);
    const float2 vdq = kv_row_dequant(vrow, L, vs);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) {
      const int64_t d = lane + 32 * t;
      if (d < hd) acc[t] = acc[t] * c + p * kv_load(vrow, d, L, vdq);
    }
    m = m_new;
  }

  // Merge the warps: each rescales to the common max. A warp that saw no key has l = 0 and contributes nothing.
  __shared__ float s_m[kWarps], s_l[kWarps], s_acc[kWarps][kMaxHeadDim];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int t = 0; t < kPerLane; ++t)
    if (lane + 32 * t < hd) s_acc[warp][lane + 32 * t] = acc[t];
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, s_m[w]);
  float weight[kWarps], L_total = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = s_l[w] > 0 ? expf(s_m[w] - M) : 0.0f;
    L_total += s_l[w] * weight[w];
  }
  if (gridDim.z == 1) {
    float* o = out + int64_t(meta.row) * num_heads * hd + h * hd;
    for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += s_acc[w][d] * weight[w];
      o[d] = sum / L_total;
    }
    return;
  }
  // A split's partial result: its max, its sum and its output before normalization, all relative to that max. A
  // split past the row's last key saw nothing: M = -inf, L = 0, and the merge skips it.
  const int64_t part = (int64_t(blockIdx.x) * num_heads + h) * gridDim.z + blockIdx.z;
  if (threadIdx.x == 0) {
    part_ml[2 * part] = M;
    part_ml[2 * part + 1] = L_total;
  }
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += s_acc[w][d] * weight[w];
    part_acc[part * hd + d] = sum;
  }
}

// One block per (row, head): merges the key splits' partial results, each rescaled to the common max.
__global__ void attention_merge_kernel(const float* part_ml, const float* part_acc, int64_t splits, int64_t num_heads,
                                       int64_t hd, const RowMeta* rows, float* out) {
  const int64_t h = blockIdx.y, base = (int64_t(blockIdx.x) * num_heads + h) * splits;
  float M = -INFINITY;
  for (int64_t s = 0; s < splits; ++s)
    if (part_ml[2 * (base + s) + 1] > 0) M = fmaxf(M, part_ml[2 * (base + s)]);
  float L = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const float l = part_ml[2 * (base + s) + 1];
    if (l > 0) L += l * expf(part_ml[2 * (base + s)] - M);
  }
  float* o = out + int64_t(rows[blockIdx.x].row) * num_heads * hd + h * hd;
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float l = part_ml[2 * (base + s) + 1];
      if (l > 0) sum += part_acc[(base + s) * hd + d] * expf(part_ml[2 * (base + s)] - M);
    }
    o[d] = sum / L;
  }
}

KvLayout layout_of(const KvCacheConfig& c) {
  KvLayout L;
  L.num_kv_heads = c.num_kv_heads;
  L.block_size = c.block_size;
  L.head_dim = c.head_dim;
  L.dtype = c.dtype;
  L.row_bytes = int64_t(kv_row_bytes(c.dtype, c.head_dim));
  return L;
}

void check_head_dim(int64_t hd) {
  if (hd <= 0 || hd > kMaxHeadDim)
    throw Error("cuda attention supports head_dim up to " + std::to_string(kMaxHeadDim) + ", not " +
                std::to_string(hd));
}

}  // namespace

void CudaBackend::kv_write(KvCache& cache, int64_t layer, const float* k, const float* v, int64_t rows,
                           int64_t row_stride, std::span<const int64_t> slots) {
  if (rows == 0) return;
  const KvCacheConfig& c = cache.config();
  const KvLayout L = layout_of(c);
  const float *ks = nullptr, *vs = nullptr;
  if (c.dtype == KvDType::I8Static) {
    const size_t h = size_t(c.num_kv_heads), off = size_t(layer) * h;
    ks = stage(4, std::span<const float>(c.k_scale).subspan(off, h));
    vs = stage(5, std::span<const float>(c.v_scale).subspan(off, h));
  }
  kv_write_kernel<<<dim3(unsigned(rows), unsigned(c.num_kv_heads), 2), 32, 0, stream_>>>(
      static_cast<uint8_t*>(cache.keys(layer)), static_cast<uint8_t*>(cache.values(layer)), k, v, row_stride,
      stage(6, slots), L, ks, vs);
  check_launch("kv_write_kernel");
}

void CudaBackend::attention(const float* q, int64_t q_stride, const KvCache& cache, int64_t layer,
                            std::span<const AttentionSequence> seqs, const AttentionParams& p, float* out) {
  const KvCacheConfig& c = cache.config();
  check_head_dim(p.head_dim);
  std::vector<RowMeta> rows;
  std::vector<int32_t> tables;
  int64_t max_visible = 0;  // keys seen by the row that sees the most
  for (const AttentionSequence& s : seqs) {
    const int32_t offset = int32_t(tables.size());
    tables.insert(tables.end(), s.block_table.begin(), s.block_table.end());
    for (int64_t i = 0; i < s.row_count; ++i) {
      const int64_t pos = s.context_len - s.row_count + i;
      rows.push_back(
          {int32_t(s.row_begin + i), int32_t(pos), offset, int32_t(std::max(pos, s.bidirectional_prefix - 1))});
    }
    const int64_t last_pos = s.context_len - 1;
    max_visible = std::max(max_visible, p.sliding_window > 0 ? std::min(last_pos + 1, p.sliding_window) : last_pos + 1);
  }
  if (rows.empty()) return;
  const int64_t blocks = int64_t(rows.size()) * p.num_heads;
  const int64_t splits =
      blocks >= kSplitBelowBlocks ? 1 : std::min(kMaxSplits, (max_visible + kKeysPerSplit - 1) / kKeysPerSplit);
  // Splits of equal size that together cover every row's visible keys (more than kKeysPerSplit each past the cap).
  const int64_t keys_per_split = (max_visible + splits - 1) / splits;
  const float *ks = nullptr, *vs = nullptr;
  if (c.dtype == KvDType::I8Static) {
    const size_t h = size_t(c.num_kv_heads), off = size_t(layer) * h;
    ks = stage(4, std::span<const float>(c.k_scale).subspan(off, h));
    vs = stage(5, std::span<const float>(c.v_scale).subspan(off, h));
  }
  const RowMeta* d_rows = stage(6, std::span<const RowMeta>(rows));
  const int32_t* d_tables = stage(7, std::span<const int32_t>(tables));
  float *part_ml = nullptr, *part_acc = nullptr;
  if (splits > 1) {
    auto* part = static_cast<float*>(scratch(3, size_t(blocks * splits * (2 + p.head_dim)) * sizeof(float)));
    part_ml = part;
    part_acc = part + 2 * blocks * splits;
  }
  attention_kernel<<<dim3(unsigned(rows.size()), unsigned(p.num_heads), unsigned(splits)), kWarps * 32, 0, stream_>>>(
      q, q_stride, static_cast<const uint8_t*>(cache.keys(layer)), static_cast<const uint8_t*>(cache.values(layer)),
      layout_of(c), ks, vs, d_rows, d_tables, p.num_heads, p.num_heads / p.num_kv_heads, p.scale, p.softcap,
      p.sliding_window, p.logn_length, out, keys_per_split, part_ml, part_acc);
  check_launch("attention_kernel");
  if (splits > 1) {
    attention_merge_kernel<<<dim3(unsigned(rows.size()), unsigned(p.num_heads)), 128, 0, stream_>>>(
        part_ml, part_acc, splits, p.num_heads, p.head_dim, d_rows, out);
    check_launch("attention_merge_kernel");
  }
}

}  // namespace kiln::cuda
