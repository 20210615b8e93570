#!/usr/bin/env python3
"""Convert throughput against `cp` of the same bytes, in the same run, plus peak RSS.

Generates a Llama-shaped checkpoint (TinyLlama-1.1B dimensions, random bf16 weights, 2 shards, about 2.2 GB), warms
the page cache, then alternates `cp -r` of the checkpoint and `kiln convert` (same dtype, and bf16 -> fp16) several
times. Reports median wall times, the throughput ratio convert/cp (1.0 = as fast as cp) and the peak RSS of convert
next to the largest tensor. Times and memory come from the kernel's accounting of each child (wait4).

Usage: scripts/bench_convert.py [--dir /tmp/kiln-bench] [--runs 3] [--kiln build/tools/kiln]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(d: Path):
    import torch
    from safetensors.torch import save_file
    if (d / "config.json").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    H, I, L, V, heads, kv, hd = 2048, 5632, 22, 32000, 32, 4, 64
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=H, intermediate_size=I, num_hidden_layers=L,
               num_attention_heads=heads, num_key_value_heads=kv, vocab_size=V, torch_dtype="bfloat16",
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu")
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = w(V, H)
    for i in range(L):
        s = shards[0] if i < L // 2 else shards[1]
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = w(H)
        s[p + "post_attention_layernorm.weight"] = w(H)
        s[p + "self_attn.q_proj.weight"] = w(heads * hd, H)
        s[p + "self_attn.k_proj.weight"] = w(kv * hd, H)
        s[p + "self_attn.v_proj.weight"] = w(kv * hd, H)
        s[p + "self_attn.o_proj.weight"] = w(H, heads * hd)
        s[p + "mlp.gate_proj.weight"] = w(I, H)
        s[p + "mlp.up_proj.weight"] = w(I, H)
        s[p + "mlp.down_proj.weight"] = w(H, I)
    shards[1]["model.norm.weight"] = w(H)
    shards[1]["lm_head.weight"] = w(V, H)
    weight_map = {}
    for k, s in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(s, d / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in s})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed(cmd):
    """Runs cmd; returns (wall seconds, peak RSS in MiB) from the kernel's accounting of the child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return wall, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kiln-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kiln", type=Path, default=REPO / "build" / "tools" / "kiln")
    args = ap.parse_args()
    src = args.dir / "hf"
    if not (src / "config.json").exists():
        # In a child process: the harness must stay small, or each forked child would report the harness's RSS.
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); "
                        f"import bench_convert as b; from pathlib import Path; b.make_checkpoint(Path({str(src)!r}))"],
                       check=True)
    total = sum(f.stat().st_size for f in src.iterdir())
    largest_bytes = 0
    for f in src.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = json.loads(fh.read(n))
        for k, v in h.items():
            if k != "__metadata__":
                largest_bytes = max(largest_bytes, v["data_offsets"][1] - v["data_offsets"][0])
    subprocess.run(f"cat {src}/* > /dev/null", shell=True, check=True)  # warm the page cache for both

    rows = {"cp": [], "convert": [], "convert_fp16": []}
    rss = {"convert": [], "convert_fp16": []}
    for _ in range(args.runs):
        for name, cmd, out in [
            ("cp", ["cp", "-r", str(src), str(args.dir / "cp-out")], args.dir / "cp-out"),
            ("convert", [str(args.kiln), "convert", str(src), "-o", str(args.dir / "ws"), "--dtype", "bf16"], args.dir / "ws"),
            ("convert_fp16", [str(args.kiln), "convert", str(src), "-o", str(args.dir / "ws16"), "--dtype", "fp16"], args.dir / "ws16"),
        ]:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            wall, peak = timed(cmd)
            rows[name].append(wall)
            if name in rss:
                rss[name].append(peak)
            shutil.rmtree(out, ignore_errors=True)
    cp = statistics.median(rows["cp"])
    print(f"checkpoint: {total / 1e9:.2f} GB in 2 shards, largest tensor {largest_bytes / 2**20:.0f} MiB")
    print(f"cp -r                 median {cp:6.2f} s  {total / cp / 1e9:5.2f} GB/s")
    for name in ("convert", "convert_fp16"):
        t = statistics.median(rows[name])
        print(f"kiln {name:<16} median {t:6.2f} s  {total / t / 1e9:5.2f} GB/s  ratio vs cp {cp / t:4.2f}x  "
              f"peak RSS {max(rss[name]):6.0f} MiB (largest tensor + 512 MiB = {largest_bytes / 2**20 + 512:.0f} MiB)")


if __name__ == "__main__":
    main()
