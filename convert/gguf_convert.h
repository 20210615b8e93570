#pragma once
// kiln convert FILE.gguf -o WS: a llama.cpp GGUF model (one file or a split set) -> workspace. Tensors are
// dequantized to fp32 exactly and rounded once to the workspace dtype; llama.cpp's q/k row interleaving is undone;
// the tokenizer and chat template are rebuilt from the metadata (convert/gguf_tokenizer.h). See docs/gguf.md.
#include "convert/converter.h"

namespace kiln {

// opt.dtype "auto" means bf16 for GGUF sources (they carry no float dtype of their own).
ConvertResult convert_gguf(const ConvertOptions& opt);

}  // namespace kiln
