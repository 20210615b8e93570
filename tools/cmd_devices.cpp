// kiln devices: the CPU features and CUDA devices the runtime can use.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "runtime/core/devices.h"
#include "runtime/cpu/matmul_bf16.h"
#include "runtime/cpu/matmul_int4.h"
#include "tools/command.h"

namespace kiln::tools {

static Action setup_devices(CLI::App& sub) {
  auto json_out = std::make_shared<bool>(false);
  sub.add_flag("--json", *json_out, "print the description as JSON");
  return [=]() {
    CpuFeatures c = cpu_features();
    CudaStatus g = cuda_status();
    nlohmann::ordered_json j;
    j["cpu"] = {{"threads", c.threads},
                {"avx2", c.avx2},
                {"fma", c.fma},
                {"f16c", c.f16c},
                {"avx512f", c.avx512f},
                {"avx512bw", c.avx512bw},
                {"avx512_bf16", c.avx512_bf16},
                {"amx_bf16", cpu::amx_bf16_usable()},  // listed, granted by Linux, and not turned off
                {"amx_int8", cpu::amx_int8_usable()}};
    nlohmann::ordered_json devs = nlohmann::ordered_json::array();
    for (const auto& d : g.devices)
      devs.push_back({{"index", d.index},
                      {"name", d.name},
                      {"compute_capability", std::to_string(d.sm_major) + "." + std::to_string(d.sm_minor)},
                      {"total_memory", d.total_memory},
                      {"free_memory", d.free_memory},
                      {"multiprocessors", d.multiprocessors}});
    j["cuda"] = {{"compiled", g.compiled}, {"devices", devs}};
    if (!g.runtime_error.empty()) j["cuda"]["note"] = g.runtime_error;
    if (*json_out) {
      print_json(j.dump(2));
      return 0;
    }
    std::printf("cpu: %u threads, avx2 %s, avx512f %s, avx512_bf16 %s, amx_bf16 %s, amx_int8 %s\n", c.threads,
                c.avx2 ? "yes" : "no", c.avx512f ? "yes" : "no", c.avx512_bf16 ? "yes" : "no",
                cpu::amx_bf16_usable() ? "yes" : "no", cpu::amx_int8_usable() ? "yes" : "no");
    for (const auto& d : g.devices)
      std::printf("cuda:%d %s (sm_%d%d), %.1f GiB total, %.1f GiB free\n", d.index, d.name.c_str(), d.sm_major,
                  d.sm_minor, double(d.total_memory) / (1 << 30), double(d.free_memory) / (1 << 30));
    if (g.devices.empty()) std::printf("cuda: %s\n", g.runtime_error.c_str());
    return 0;
  };
}

KILN_COMMAND(90, "devices", "List the CPU features and CUDA devices kiln can use", setup_devices);

}  // namespace kiln::tools
