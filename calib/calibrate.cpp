#include "calib/calibrate.h"

#include <algorithm>

#include "runtime/core/error.h"
#include "runtime/io/interrupt.h"
#include "runtime/io/safetensors.h"
#include "runtime/workspace/workspace.h"

namespace kiln::calib {

StatsObserver run_calibration(const Workspace& ws, Backend& backend, const Blocks& blocks,
                              const LayerStreamOptions& options, const std::function<void(int64_t)>& on_layer) {
  LayerStream stream(ws, backend, blocks, options);
  StatsObserver stats(ws.spec());
  const WorkspaceSource src(ws);
  for (int64_t l = 0; l < stream.num_layers(); ++l) {
    stream.run_layer(l, src, &stats, /*advance=*/l + 1 < stream.num_layers());
    stream.release_pages(l);
    if (on_layer) on_layer(l + 1);
  }
  return stats;
}

namespace {

std::vector<float> means(const std::vector<double>& sums, int64_t rows) {
  std::vector<float> out(sums.size());
  for (size_t i = 0; i < sums.size(); ++i) out[i] = float(sums[i] / double(std::max<int64_t>(rows, 1)));
  return out;
}

}  // namespace

SafetensorsWriter::Result write_stats(const std::filesystem::path& path, const StatsObserver& stats,
                                      const Blocks& blocks, const std::map<std::string, std::string>& metadata) {
  // Plan and payload are built together so that names, shapes and bytes cannot disagree.
  std::vector<TensorPlan> plan;
  std::vector<std::vector<float>> payload;
  auto add = [&](std::string name, std::vector<float> v) {
    plan.push_back({std::move(name), DType::F32, {int64_t(v.size())}});
    payload.push_back(std::move(v));
  };
  // Layer by layer: its linear inputs in canonical order, then its K/V ranges.
  size_t next_linear = 0;
  for (size_t li = 0; li < stats.layers().size(); ++li) {
    const LayerStats& l = stats.layers()[li];
    const std::string layer_prefix = "layers." + std::to_string(li) + ".";
    for (; next_linear < stats.linears().size() && stats.linears()[next_linear].first.rfind(layer_prefix, 0) == 0;
         ++next_linear) {
      const auto& [name, c] = stats.linears()[next_linear];
      const std::string p = linear_input_prefix(name);
      add(p + ".abs_mean", means(c.abs_sum, c.rows));
      add(p + ".abs_max", c.abs_max);
      add(p + ".sq_mean", means(c.sq_sum, c.rows));
    }
    const std::string kv = "layers." + std::to_string(li) + ".kv.";
    add(kv + "k_min", l.k.min);
    add(kv + "k_max", l.k.max);
    add(kv + "k_abs_max", l.k.abs_max);
    add(kv + "v_min", l.v.min);
    add(kv + "v_max", l.v.max);
    add(kv + "v_abs_max", l.v.abs_max);
  }
  std::vector<TensorPlan> full{{"calib.starts", DType::I64, {blocks.count()}},
                               {"calib.tokens", DType::I32, {blocks.count(), blocks.seqlen}}};
  full.insert(full.end(), plan.begin(), plan.end());
  SafetensorsWriter w(path.string(), full, metadata);
  w.write(blocks.starts.data(), blocks.starts.size() * sizeof(int64_t));
  w.write(blocks.tokens.data(), blocks.tokens.size() * sizeof(int32_t));
  for (const auto& v : payload) w.write(v.data(), v.size() * sizeof(float));
  return w.finish();
}

}  // namespace kiln::calib
