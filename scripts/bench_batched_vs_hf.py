#!/usr/bin/env python3
"""Batched generation throughput: kiln (`kiln bench offline`, continuous batching) against HF transformers `generate`
on the same model, device and request shape — the anchor of issue #7's "batched throughput at concurrency 64" (goal:
kiln >= 10x on an H100). Both sides generate exactly --output-len greedy tokens for every request from prompts of
--input-len random token ids; only output tokens count, over the wall time of the whole batch.

The model is a Llama-shaped checkpoint with random weights (speed does not depend on the values), written once by
transformers' save_pretrained into OUT/hf with the llama2 test tokenizer, then converted by kiln into OUT/ws.

  python3 scripts/bench_batched_vs_hf.py                       # 1.2B Llama shape, bf16, cuda, concurrency 64
  python3 scripts/bench_batched_vs_hf.py --shape tiny --device cpu --concurrency 4 --output-len 8   # smoke test

kiln runs on KILN_DEVICE=--device; transformers on torch device --device.
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # Llama 3.2 1B's layer shapes with the llama2 tokenizer's 32k vocabulary: 1.2B parameters
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def write_checkpoint(hf_dir, shape, dtype):
    if (hf_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    model = LlamaForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(hf_dir)
    tok = REPO / "tests" / "data" / "tokenizers" / "llama2"
    with gzip.open(tok / "tokenizer.json.gz") as src, open(hf_dir / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(tok / "tokenizer_config.json", hf_dir / "tokenizer_config.json")


def kiln_throughput(kiln, ws, args):
    env = dict(os.environ, KILN_DEVICE=args.device)
    r = subprocess.run([kiln, "bench", "offline", str(ws), "-n", str(args.num_prompts), "-c", str(args.concurrency),
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                        "--max-running", str(args.concurrency), "--max-batch-tokens", str(args.max_batch_tokens),
                        "--kv-cache-mib", str(args.kv_cache_mib), "--json"],
                       env=env, check=True, capture_output=True, text=True)
    return json.loads(r.stdout)["runs"][0]


def hf_throughput(hf_dir, args):
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=DTYPES[args.dtype]).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 1000, (args.concurrency, args.input_len), generator=gen)
               for _ in range(max(1, args.num_prompts // args.concurrency))]
    kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(batches[0][:, :8].to(device), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        produced = 0
        for ids in batches:
            out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device), **kw)
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    return {"output_tokens": produced, "seconds": secs, "output_tokens_per_s": produced / secs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench_batched")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-mib", type=int, default=8192)
    p.add_argument("--kiln", default=str(REPO / "build" / "tools" / "kiln"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    out = args.out / f"{args.shape}-{args.dtype}"
    hf_dir, ws = out / "hf", out / "ws"
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(hf_dir, args.shape, args.dtype)
    if not (ws / "kiln.json").exists():
        subprocess.run([args.kiln, "convert", str(hf_dir), "-o", str(ws), "--json"], check=True, capture_output=True)
    kiln = kiln_throughput(args.kiln, ws, args)
    hf = hf_throughput(hf_dir, args)
    kiln_tps = kiln["output_tokens_per_s"]
    result = {"shape": args.shape, "dtype": args.dtype, "device": args.device, "concurrency": args.concurrency,
              "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
              "kiln": kiln, "hf_transformers": hf, "ratio_kiln_over_hf": kiln_tps / hf["output_tokens_per_s"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.shape} {args.dtype} on {args.device}, concurrency {args.concurrency}, "
              f"{args.input_len} in / {args.output_len} out:")
        print(f"  kiln bench offline       {kiln_tps:10.1f} output tokens/s")
        print(f"  transformers generate    {hf['output_tokens_per_s']:10.1f} output tokens/s")
        print(f"  ratio                    {result['ratio_kiln_over_hf']:10.2f}x  (goal on an H100: >= 10x)")


if __name__ == "__main__":
    main()
