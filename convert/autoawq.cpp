#include "convert/autoawq.h"

#include <algorithm>
#include <cctype>
#include <cstring>

#include "runtime/core/error.h"

using nlohmann::json;
using nlohmann::ordered_json;

namespace kiln {

bool has_quantization_config(const json& config) {
  auto it = config.find("quantization_config");
  return it != config.end() && !it->is_null();
}

bool is_autoawq_config(const json& config) {
  if (!has_quantization_config(config)) return false;
  const json& q = config["quantization_config"];
  auto m = q.find("quant_method");
  if (!q.is_object() || m == q.end() || !m->is_string()) return false;
  std::string method = m->get<std::string>();
  std::transform(method.begin(), method.end(), method.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return method == "awq";
}

namespace {

// AutoAWQ's own files say w_bit / q_group_size; transformers' AwqConfig says bits / group_size. Both are read.
const json* either(const json& q, const char* a, const char* b) {
  for (const char* key : {a, b}) {
    auto it = q.find(key);
    if (it != q.end() && !it->is_null()) return &*it;
  }
  return nullptr;
}

}  // namespace

AutoAwqConfig parse_autoawq_config(const json& config, const std::string& label) {
  const json& q = config.at("quantization_config");
  const std::string f = label + ": quantization_config";
  AutoAwqConfig c;
  c.source = q;
  std::string version = "gemm";  // transformers' AwqConfig default
  if (auto it = q.find("version"); it != q.end() && !it->is_null()) {
    if (!it->is_string()) throw Error(f + ".version must be a string");
    version = it->get<std::string>();
    std::transform(version.begin(), version.end(), version.begin(),
                   [](unsigned char ch) { return char(std::tolower(ch)); });
  }
  if (version != "gemm")
    throw Error(f + ".version is '" + version +
                "'; kiln reads only the AutoAWQ GEMM layout (gemv, marlin, exllama and "
                "ipex pack their codes differently)");
  const json* bits = either(q, "bits", "w_bit");
  if (!bits || !bits->is_number_integer()) throw Error(f + " has no integer 'bits' (or 'w_bit')");
  c.bits = bits->get<int64_t>();
  if (c.bits != 4) throw Error(f + ".bits is " + std::to_string(c.bits) + "; kiln reads 4-bit weights only");
  const json* gs = either(q, "group_size", "q_group_size");
  if (!gs || !gs->is_number_integer()) throw Error(f + " has no integer 'group_size' (or 'q_group_size')");
  c.group_size = gs->get<int64_t>();
  if (c.group_size <= 0 || c.group_size % 2)
    throw Error(f + ".group_size is " + std::to_string(c.group_size) +
                "; kiln needs a positive even group size (per-channel -1 is not supported)");
  bool zero_point = true;  // AwqConfig default
  if (auto it = q.find("zero_point"); it != q.end() && !it->is_null()) {
    if (!it->is_boolean()) throw Error(f + ".zero_point must be true or false");
    zero_point = it->get<bool>();
  }
  if (!zero_point) throw Error(f + ".zero_point is false; kiln reads only asymmetric AWQ (zero_point true)");
  return c;
}

ordered_json autoawq_quantization_config(int64_t group_size) {
  return {{"quant_method", "awq"}, {"bits", 4},         {"group_size", group_size},
          {"zero_point", true},    {"version", "gemm"}, {"modules_to_not_convert", nullptr}};
}

AutoAwqLinear pack_autoawq(const uint8_t* qweight, const uint16_t* scales, const uint8_t* zeros, int64_t out,
                           int64_t in, int64_t group_size) {
  AutoAwqLinear a;
  a.out = out;
  a.in = in;
  a.group_size = group_size;
  const int64_t G = in / group_size, cols = out / 8, row_bytes = in / 2;
  a.qweight.assign(size_t(in * cols), 0);
  a.qzeros.assign(size_t(G * cols), 0);
  a.scales.assign(size_t(G * out), 0);
  for (int64_t c = 0; c < cols; ++c) {
    for (int i = 0; i < 8; ++i) {
      const int64_t o = 8 * c + kAutoAwqOrder[size_t(i)];
      const uint8_t* row = qweight + o * row_bytes;
      for (int64_t k = 0; k < in; ++k) {
        const uint32_t code = (row[k / 2] >> (4 * (k & 1))) & 0xF;
        a.qweight[size_t(k * cols + c)] = int32_t(uint32_t(a.qweight[size_t(k * cols + c)]) | (code << (4 * i)));
      }
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t z = zeros[o * G + g] & 0xF;
        a.qzeros[size_t(g * cols + c)] = int32_t(uint32_t(a.qzeros[size_t(g * cols + c)]) | (z << (4 * i)));
      }
    }
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < G; ++g) a.scales[size_t(g * out + o)] = scales[o * G + g];
  return a;
}

void unpack_autoawq(const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales, int64_t out, int64_t in,
                    int64_t group_size, uint8_t* kiln_qweight, uint16_t* kiln_scales, uint8_t* kiln_zeros) {
  const int64_t G = in / group_size, cols = out / 8, row_bytes = in / 2;
  std::memset(kiln_qweight, 0, size_t(out * row_bytes));
  for (int64_t c = 0; c < cols; ++c) {
    for (int i = 0; i < 8; ++i) {
      const int64_t o = 8 * c + kAutoAwqOrder[size_t(i)];
      uint8_t* row = kiln_qweight + o * row_bytes;
      for (int64_t k = 0; k < in; ++k) {
        const uint8_t code = uint8_t((uint32_t(qweight[k * cols + c]) >> (4 * i)) & 0xF);
        row[k / 2] = uint8_t(row[k / 2] | (code << (4 * (k & 1))));
      }
      for (int64_t g = 0; g < G; ++g)
        kiln_zeros[o * G + g] = uint8_t((uint32_t(qzeros[g * cols + c]) >> (4 * i)) & 0xF);
    }
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t g = 0; g < G; ++g) kiln_scales[o * G + g] = scales[g * out + o];
}

}  // namespace kiln
