#include "runtime/kv/kv_scales.h"

#include <cmath>
#include <cstring>

#include "runtime/core/error.h"
#include "runtime/io/safetensors.h"

namespace kiln {

std::string kv_scales_file_bytes(int64_t num_layers, int64_t num_kv_heads, const KvStaticScales& s) {
  const size_t n = size_t(num_layers * num_kv_heads), bytes = n * 4;
  const std::string shape = "[" + std::to_string(num_layers) + "," + std::to_string(num_kv_heads) + "]";
  std::string header = "{\"kv_cache.k_scale\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":[0," +
                       std::to_string(bytes) + "]},\"kv_cache.v_scale\":{\"dtype\":\"F32\",\"shape\":" + shape +
                       ",\"data_offsets\":[" + std::to_string(bytes) + "," + std::to_string(2 * bytes) + "]}}";
  while (header.size() % 8) header += ' ';  // the data section starts 8-byte aligned, as safetensors recommends
  std::string out(8, '\0');
  uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((len >> (8 * i)) & 0xff);  // little-endian u64
  out += header;
  out.append(reinterpret_cast<const char*>(s.k.data()), bytes);  // little-endian hosts only, like the weights
  out.append(reinterpret_cast<const char*>(s.v.data()), bytes);
  return out;
}

std::optional<KvStaticScales> read_kv_static_scales(const WorkspaceInfo& info) {
  if (!info.manifest.count(kKvScalesFile)) return std::nullopt;
  const std::string path = (info.dir / kKvScalesFile).string();
  SafetensorsFile f(path);
  const std::vector<int64_t> want = {info.spec.num_layers, info.spec.num_kv_heads};
  KvStaticScales s;
  for (auto [name, dst] : {std::pair{"kv_cache.k_scale", &s.k}, std::pair{"kv_cache.v_scale", &s.v}}) {
    const TensorInfo* t = f.find(name);
    if (!t) throw Error(path + ": tensor '" + std::string(name) + "' is missing");
    if (t->dtype != DType::F32 || t->shape != want)
      throw Error(path + ": tensor '" + std::string(name) + "' must be f32 " + shape_string(want) +
                  " (layers, kv heads), not " + shape_string(t->shape));
    dst->resize(size_t(t->numel()));
    std::memcpy(dst->data(), f.data(*t), dst->size() * 4);
    for (float x : *dst)
      if (!std::isfinite(x) || x < 0)
        throw Error(path + ": tensor '" + std::string(name) + "' holds a scale " + std::to_string(x) +
                    " that is negative or not finite");
  }
  return s;
}

}  // namespace kiln
