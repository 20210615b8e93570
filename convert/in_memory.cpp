#include "convert/in_memory.h"

#include "convert/autoawq.h"
#include "convert/autoawq_import.h"
#include "convert/config_check.h"
#include "convert/converter.h"
#include "runtime/core/error.h"

namespace kiln {

namespace {

// Collects one tensor's bytes. A tensor that is a single unconverted source range is not copied at all: the
// workspace points into the checkpoint's map, which the returned Workspace keeps alive.
struct MemorySink : TensorSink {
  std::vector<uint8_t> bytes;
  const uint8_t* mapped = nullptr;  // the zero-copy range, while it is the only piece
  size_t mapped_size = 0;
  void materialize() {
    if (mapped) bytes.assign(mapped, mapped + mapped_size);
    mapped = nullptr;
  }
  void write(const void* p, size_t n) override {
    materialize();
    const uint8_t* b = static_cast<const uint8_t*>(p);
    bytes.insert(bytes.end(), b, b + n);
  }
  void copy(const MappedFile& file, uint64_t offset, size_t n) override {
    if (!mapped && bytes.empty()) {
      mapped = file.data() + offset;
      mapped_size = n;
      return;
    }
    write(file.data() + offset, n);
  }
};

struct Owned {
  std::unique_ptr<HfCheckpoint> ckpt;
  std::vector<std::vector<uint8_t>> buffers;
};

}  // namespace

std::unique_ptr<Workspace> open_hf_in_memory(const std::filesystem::path& hf_dir) {
  auto owned = std::make_shared<Owned>();
  owned->ckpt = std::make_unique<HfCheckpoint>(hf_dir);
  const HfCheckpoint& ckpt = *owned->ckpt;
  const std::string label = (hf_dir / "config.json").string();
  if (has_quantization_config(with_legacy_autoawq_config(ckpt.config(), hf_dir)))
    throw Error(label + " declares a quantization_config; convert the checkpoint first ('kiln convert " +
                hf_dir.string() + " -o WS')");
  WorkspaceInfo info;
  info.dir = hf_dir;
  info.spec = spec_from_hf_config(ckpt.config(), ckpt.generation_config(), label);
  const ArchEntry& arch = find_architecture(ckpt.config(), label);
  check_config_against_tensors(ckpt, info.spec, arch, label);
  add_family_turn_end_tokens(info.spec, ckpt.config(), hf_dir);  // as convert does
  const DType target = resolve_target_dtype("auto", ckpt);
  info.dtype = workspace_dtype_name(target);
  info.json = {
      {"format", kWorkspaceFormat},
      {"format_version", spec_format_version(info.spec)},
      {"model", spec_to_json(info.spec)},
      {"dtype", info.dtype},
      {"quantization", {{"weights", {{"method", "none"}}}, {"kv_cache", {{"dtype", "auto"}}}}},
      {"provenance",
       {{"source", std::filesystem::absolute(hf_dir).lexically_normal().string()}, {"converted_in_memory", true}}}};

  std::vector<TensorMapping> mappings = tensor_mappings(info.spec, arch);
  check_sources(ckpt, mappings, arch, info.spec, label);
  std::vector<Workspace::MemoryTensor> tensors;
  for (const TensorMapping& m : mappings) {
    MemorySink sink;
    emit_tensor(ckpt, m, target, sink);
    TensorInfo ti;
    ti.name = m.canonical;
    ti.dtype = target;
    ti.shape = m.shape;
    const uint8_t* bytes;
    if (sink.mapped) {
      bytes = sink.mapped;
      ti.end = sink.mapped_size;
    } else {
      owned->buffers.push_back(std::move(sink.bytes));
      bytes = owned->buffers.back().data();
      ti.end = owned->buffers.back().size();
    }
    tensors.push_back({std::move(ti), bytes});
  }
  return std::make_unique<Workspace>(std::move(info), std::move(tensors), owned);
}

}  // namespace kiln
