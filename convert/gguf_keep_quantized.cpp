#include "convert/gguf_keep_quantized.h"

#include <cmath>
#include <cstring>

#include "runtime/core/dtype.h"
#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"

namespace kiln::gguf {

namespace {

constexpr uint32_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32;

// One block's int4 form: scale (fp16 bits), zero point, and the 32 codes in input order.
struct Int4Block {
  uint16_t scale;
  uint8_t zero;
  uint8_t codes[kBlock];
};

// Decodes a Q4_0 / Q4_1 block into kiln's int4 terms; false when a Q4_1 block's m is not -z·d for an integer z in
// 0..15 (then (q - z)·d cannot equal d·q + m for every code).
bool to_int4(uint32_t type, const uint8_t* block, Int4Block& out) {
  std::memcpy(&out.scale, block, 2);
  const uint8_t* qs = block + (type == kQ4_0 ? 2 : 4);
  for (int j = 0; j < 16; ++j) {  // ggml: element j in the low nibble of byte j, element j + 16 in the high one
    out.codes[j] = qs[j] & 0x0F;
    out.codes[j + 16] = qs[j] >> 4;
  }
  if (type == kQ4_0) {
    out.zero = 8;
    return true;
  }
  uint16_t mbits;
  std::memcpy(&mbits, block + 2, 2);
  const float d = f16_to_f32(out.scale), m = f16_to_f32(mbits);
  if (d == 0) {
    out.zero = 0;
    return m == 0;
  }
  const float z = -m / d;
  if (!(z >= 0 && z <= 15) || z != std::nearbyint(z) || -z * d != m) return false;
  out.zero = uint8_t(z);
  return true;
}

const SourceTensor& source(const Model& model, const Part& part) { return *model.tensor(part.name); }

// The source row of canonical row r of a part (llama.cpp's q/k interleaving undone: see unpermute_rows).
int64_t source_row(const Part& part, int64_t r) {
  if (!part.unpermute_heads) return part.first_row + r;
  const int64_t d = part.rows / part.unpermute_heads, half = d / 2, h = r / d, w = r % d;
  return part.first_row + h * d + 2 * (w % half) + w / half;
}

}  // namespace

WeightQuantization kept_int4_quantization(const Model& model, const ModelSpec& spec,
                                          const std::vector<CanonicalTensor>& canonical,
                                          const std::vector<Mapping>& mappings) {
  WeightQuantization q;
  q.method = "rtn";
  q.bits = 4;
  q.group_size = kBlock;
  q.zero_point = true;
  q.modules = default_quantized_modules(spec);
  for (size_t i = 0; i < canonical.size(); ++i) {
    if (!q.covers(canonical[i].suffix)) continue;
    for (const Part& p : mappings[i].parts) {
      const SourceTensor& t = source(model, p);
      const TensorType& type = *t.info->type;
      const std::string where = t.file->path() + ": --keep-quantized: tensor '" + p.name + "' ";
      if (type.id != kQ4_0 && type.id != kQ4_1)
        throw Error(where + "is " + type.name +
                    ", which kiln's int4 layout does not hold exactly (exact: Q4_0, and Q4_1 where m = -z*d); convert "
                    "without --keep-quantized to dequantize");
      if (type.id != kQ4_1) continue;
      const int64_t cols = mappings[i].shape[1], row_bytes = cols / kBlock * type.type_size;
      Int4Block b;
      for (int64_t r = 0; r < p.rows; ++r)
        for (int64_t k = 0; k < cols / kBlock; ++k)
          if (!to_int4(type.id, t.data() + (p.first_row + r) * row_bytes + k * type.type_size, b))
            throw Error(where + "is Q4_1 whose block " + std::to_string(k) + " of row " + std::to_string(r) +
                        " has a minimum m that is not -z*d for a zero point z in 0..15, so it has no exact int4 form; "
                        "convert without --keep-quantized to dequantize");
    }
  }
  return q;
}

void emit_kept_int4(const Model& model, const Mapping& m, WorkspaceWriter& writer, TensorSink& sink) {
  const int64_t cols = m.shape[1], groups = cols / kBlock;
  std::vector<uint8_t> codes(size_t(m.shape[0] * cols / 2)), zeros(size_t(m.shape[0] * groups));
  std::vector<uint16_t> scales(zeros.size());
  int64_t out_row = 0;
  Int4Block b;
  for (const Part& p : m.parts) {
    check_interrupt();
    const SourceTensor& t = source(model, p);
    const TensorType& type = *t.info->type;
    const int64_t row_bytes = groups * type.type_size;
    for (int64_t r = 0; r < p.rows; ++r, ++out_row) {
      const uint8_t* row = t.data() + source_row(p, r) * row_bytes;
      uint8_t* out = codes.data() + out_row * cols / 2;
      for (int64_t g = 0; g < groups; ++g) {
        if (!to_int4(type.id, row + g * type.type_size, b))
          throw Error(t.file->path() + ": tensor '" + p.name + "' changed while being read");
        scales[size_t(out_row * groups + g)] = b.scale;
        zeros[size_t(out_row * groups + g)] = b.zero;
        for (int j = 0; j < kBlock; j += 2) out[(g * kBlock + j) / 2] = uint8_t(b.codes[j] | (b.codes[j + 1] << 4));
      }
    }
    t.file->mapped().dont_need(t.file->header().data_start + t.info->offset, t.info->nbytes);
  }
  writer.begin_tensor();
  sink.write(codes.data(), codes.size());
  writer.begin_tensor();
  sink.write(scales.data(), scales.size() * 2);
  writer.begin_tensor();
  sink.write(zeros.data(), zeros.size());
}

const SourceTensor* kept_int8_head(const Model& model, const ModelSpec& spec, const Architecture& arch) {
  const SourceTensor* t = model.tensor(spec.tie_word_embeddings ? arch.names.embedding : arch.names.lm_head);
  return t && t->info->type->id == kQ8_0 ? t : nullptr;
}

void emit_kept_int8_head(const SourceTensor& head, WorkspaceWriter& writer, TensorSink& sink) {
  check_interrupt();
  const TensorType& type = *head.info->type;  // Q8_0: 2 bytes of fp16 scale, then 32 int8 codes
  const int64_t rows = head.info->dims.size() > 1 ? int64_t(head.info->dims[1]) : 1;
  const int64_t blocks = int64_t(head.info->dims[0]) / kBlock;
  std::vector<uint8_t> codes(size_t(rows * blocks * kBlock));
  std::vector<uint8_t> scales(size_t(rows * blocks * 2));
  const uint8_t* src = head.data();
  for (int64_t b = 0; b < rows * blocks; ++b) {
    std::memcpy(scales.data() + b * 2, src + b * type.type_size, 2);
    std::memcpy(codes.data() + b * kBlock, src + b * type.type_size + 2, kBlock);
  }
  head.file->mapped().dont_need(head.file->header().data_start + head.info->offset, head.info->nbytes);
  writer.begin_tensor();
  sink.write(codes.data(), codes.size());
  writer.begin_tensor();
  sink.write(scales.data(), scales.size());
}

}  // namespace kiln::gguf
