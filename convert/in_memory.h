#pragma once
// Opens an HF checkpoint directory as a workspace without writing one: the same mapping and dtype rules as
// `kiln convert`, with tensors left in the checkpoint's own memory maps where no conversion is needed.
#include <filesystem>
#include <memory>

#include "runtime/workspace/workspace.h"

namespace kiln {

// dtype "auto" keeps the checkpoint's dtype, as convert does.
std::unique_ptr<Workspace> open_hf_in_memory(const std::filesystem::path& hf_dir);

}  // namespace kiln
