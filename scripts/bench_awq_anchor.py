#!/usr/bin/env python3
"""kiln AWQ W4A16 against llm-compressor's AWQ (the speed and quality anchor of issue 14), on CPU, same model, same
calibration tokens, same group size. Not a test: it prints a table and writes a JSON summary.

Both tools start from the same fp32 Hugging Face checkpoint (kiln through `kiln convert --dtype fp32`). The calibration
blocks are kiln's own draw (docs/calibration.md: the .txt file tokenized without special tokens, `samples` blocks of
`seqlen` tokens at seeded non-overlapping offsets, re-implemented here as tests/python/test_calibrate.py does), handed
to llm-compressor as a pre-tokenized dataset, so both calibrate on identical token blocks. Each tool runs as a child
process; its wall time, CPU time (user+sys) and peak RSS come from os.wait4 of that child alone.

Quality: the first `--eval-tokens` tokens of the held-out text in non-overlapping windows of `--ctx` (no BOS, as
`kiln eval`); each window gives ctx-1 predictions. Reference logits come from transformers on the unquantized
checkpoint, kiln's from `kiln eval --tokens --save-logits`, llm-compressor's from transformers loading its compressed
output (compressed-tensors decompresses it). KL(ref || quant), top-1 agreement and perplexities are computed here, the
same way for both. The kiln fp32 workspace is also evaluated, as a check that kiln's and transformers' logits agree.

llm-compressor runs in its own venv (it pins transformers <= 5.17): `python3 -m venv --system-site-packages
/work/llmc-venv && /work/llmc-venv/bin/pip install llmcompressor`. It is never part of setup.sh or CI.

The machine is shared: loadavg and a fixed pure-Python probe are recorded before and after; compare CPU seconds.

Usage: nice scripts/bench_awq_anchor.py --kiln build/kiln --hf MODEL_DIR --out build/awq-bench
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

M64 = (1 << 64) - 1


def _mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def draw_starts(total, samples, seqlen, seed):  # calib/dataset.h sample_blocks
    k = min(samples, total // seqlen)
    slack = total - k * seqlen
    key = _mix(seed ^ 0x6A09E667F3BCC909)
    u = sorted(_mix((key + (i + 1) * 0x9E3779B97F4A7C15) & M64) % (slack + 1) for i in range(k))
    return [u[i] + i * seqlen for i in range(k)]


def probe_ms():  # fixed pure-Python work; its wall time tracks how much CPU this process gets
    t = time.perf_counter()
    s = 0
    for i in range(3_000_000):
        s += i * i
    return (time.perf_counter() - t) * 1e3


def machine_load():
    return {"loadavg": list(os.getloadavg()), "probe_ms": round(probe_ms(), 1), "time": time.strftime("%H:%M:%S")}


def start(cmd, log, env=None):
    """stdout to `log` (kiln's --json summary stays parseable), stderr to `log` + ".err" (its per-layer JSON lines)."""
    with open(log, "w") as f, open(str(log) + ".err", "w") as e:
        return subprocess.Popen(cmd, stdout=f, stderr=e, env=env), time.perf_counter(), cmd, log


def wait_measured(started):
    """Waits for a child from start(); returns wall s, CPU s (user+sys) and peak RSS (GB) of that child alone."""
    p, t0, cmd, log = started
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"bench_awq_anchor: {' '.join(map(str, cmd))} failed ({rc}); see {log} and {log}.err")
    return {"wall_s": round(wall, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
            "user_s": round(ru.ru_utime, 1), "peak_rss_gb": round(ru.ru_maxrss / 1024**2, 3)}


# ---- children run in the llm-compressor venv (same file, other entry points)
def llmc_quantize(a):
    import torch
    from datasets import Dataset
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # llm-compressor 0.14 pins the AWQ activation cache (IntermediatesCache.pin_memory, for faster host-to-GPU copies)
    # unconditionally, which raises "Cannot access accelerator device when none is available" on a CPU-only torch.
    # Pinning only affects copy speed to a GPU, never values, so on CPU it is made a no-op.
    from llmcompressor.pipelines.cache import IntermediatesCache
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    torch.manual_seed(0)
    blocks = json.loads(Path(a.blocks).read_text())
    ds = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]})
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.hf)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=a.group_size)
    recipe = [AWQModifier(),
              QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                   ignore=["lm_head"])]
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(blocks[0]),
            num_calibration_samples=len(blocks), shuffle_calibration_samples=False)
    print(f"oneshot: {time.perf_counter() - t:.1f} s wall", flush=True)
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)


def hf_logits(a):
    """Logits of a transformers-loadable checkpoint over the eval tokens, windowed as kiln eval."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    tokens = json.loads(Path(a.tokens).read_text())
    kw = {}
    if "quantization_config" in json.loads((Path(a.hf) / "config.json").read_text()):
        from transformers import CompressedTensorsConfig  # llm-compressor's output: decompressed to dense weights
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, **kw).eval()
    rows = []
    with torch.no_grad():
        for s in range(0, len(tokens), a.ctx):
            ids = torch.tensor([tokens[s:s + a.ctx]])
            rows.append(model(input_ids=ids).logits[0].float())
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "logits": torch.cat(rows).contiguous()}, a.out)


def make_7b_shaped(out, layers, tokenizer_dir):
    """A Llama-2-7B-shaped bf16 checkpoint (hidden 4096, intermediate 11008, 32 heads, no GQA) with `layers` decoder
    layers of random weights, one safetensors shard per layer so that only one layer is ever held in memory. The
    vocabulary is the tokenizer's (SmolLM2's 49152 ids): it sizes only the embedding and head, not a layer's cost."""
    import shutil
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    h, inter, vocab = 4096, 11008, 49152
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
           "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": layers, "head_dim": 128,
           "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": "bfloat16"}
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map = {}

    def write(shard):  # one shard per call: at most one layer is ever in memory
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})

    write({"model.embed_tokens.weight": rand(vocab, h), "lm_head.weight": rand(vocab, h),
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for i in range(layers):
        p = f"model.layers.{i}."
        write({p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
               p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
               **{p + f"self_attn.{n}.weight": rand(h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
               p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
               p + "mlp.down_proj.weight": rand(h, inter)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / f, out / f)


# ---- the driver
def compare(ref_path, q_path, ctx):
    import torch
    from safetensors.torch import load_file

    ref, q = load_file(ref_path), load_file(q_path)
    assert torch.equal(ref["tokens"], q["tokens"]), f"{q_path}: other tokens than {ref_path}"
    tokens, n = ref["tokens"].long(), ref["tokens"].numel()
    agree = nll_ref = nll_q = count = 0.0
    kls = []
    for s in range(0, n, ctx):
        e = min(s + ctx, n)
        if e - s < 2:
            continue
        lr = torch.log_softmax(ref["logits"][s:e - 1].double(), -1)
        lq = torch.log_softmax(q["logits"][s:e - 1].double(), -1)
        kl = (lr.exp() * (lr - lq)).sum(-1)
        kls.append(kl)
        agree += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
        nxt = tokens[s + 1:e]
        nll_ref -= lr.gather(1, nxt[:, None]).sum().item()
        nll_q -= lq.gather(1, nxt[:, None]).sum().item()
        count += e - 1 - s
    kl = torch.cat(kls)
    return {"predictions": int(count), "kld_mean": kl.mean().item(), "kld_p99": kl.quantile(0.99).item(),
            "top1": agree / count, "ppl_ref": float(torch.exp(torch.tensor(nll_ref / count))),
            "ppl": float(torch.exp(torch.tensor(nll_q / count)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="build/tools/kiln")
    ap.add_argument("--hf", required=True, help="fp32 Hugging Face checkpoint (scripts/get_real_model.py)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    ap.add_argument("--calib", default="tests/data/text/devils_dictionary_calib.txt")
    ap.add_argument("--eval-text", default="tests/data/text/devils_dictionary_eval.txt")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--kiln-args", default="", help="extra kiln quantize arguments, e.g. '--awq-inputs quantized'")
    ap.add_argument("--concurrent", action="store_true", help="run both quantizations at once (CPU s stay per child)")
    ap.add_argument("--skip", default="", help="comma list of steps to reuse from --out: kiln,llmc")
    # child entry points (run under --llmc-python)
    ap.add_argument("--child", choices=["llmc-quantize", "hf-logits"])
    ap.add_argument("--blocks")
    ap.add_argument("--tokens")
    ap.add_argument("--make-7b-shaped", type=Path, help="write a Llama-2-7B-shaped bf16 checkpoint here and exit")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of --make-7b-shaped")
    a = ap.parse_args()
    if a.make_7b_shaped:
        return make_7b_shaped(a.make_7b_shaped, a.layers, a.hf)
    if a.child == "llmc-quantize":
        return llmc_quantize(a)
    if a.child == "hf-logits":
        return hf_logits(a)

    from transformers import AutoTokenizer

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    me = str(Path(__file__).resolve())
    summary = {"load_before": machine_load(), "samples": a.samples, "seqlen": a.seqlen, "group_size": a.group_size,
               "nproc": os.cpu_count()}
    print("load before:", summary["load_before"], flush=True)

    tok = AutoTokenizer.from_pretrained(a.hf)
    stream = tok.encode(Path(a.calib).read_text(encoding="utf-8"), add_special_tokens=False)
    starts = draw_starts(len(stream), a.samples, a.seqlen, a.seed)
    (out / "calib_blocks.json").write_text(json.dumps([stream[s:s + a.seqlen] for s in starts]))
    eval_tokens = tok.encode(Path(a.eval_text).read_text(encoding="utf-8"), add_special_tokens=False)[:a.eval_tokens]
    (out / "eval_tokens.json").write_text(json.dumps(eval_tokens))
    summary["calib_tokens"] = len(starts) * a.seqlen
    summary["eval_tokens"] = len(eval_tokens)

    ws_fp = out / "ws-fp32"
    if not (ws_fp / "kiln.json").exists():
        subprocess.run([a.kiln, "convert", a.hf, "-o", ws_fp, "--dtype", "fp32"], check=True)

    # the two quantizations: one after the other, or with --concurrent both at once (each child's CPU seconds stay
    # its own; wall times then include the other's load)
    runs = {}
    if "kiln" not in skip:
        cmd = [a.kiln, "quantize", ws_fp, "-o", out / "kiln-awq", "--method", "awq", "--group-size",
               str(a.group_size), "--data", a.calib, "--samples", str(a.samples), "--seqlen", str(a.seqlen),
               "--seed", str(a.seed), "--force", "--json"] + a.kiln_args.split()
        runs["kiln"] = (cmd, out / "kiln-quantize.log")
    if "llmc" not in skip:
        cmd = [a.llmc_python, me, "--child", "llmc-quantize", "--hf", a.hf, "--blocks", str(out / "calib_blocks.json"),
               "--group-size", str(a.group_size), "--out", str(out / "llmc-awq")]
        runs["llmc"] = (cmd, out / "llmc-quantize.log")
    summary["concurrent"] = a.concurrent
    if a.concurrent:
        started = {k: start(c, log, env) for k, (c, log) in runs.items()}
        for k, st in started.items():
            summary[k] = wait_measured(st)
            print(k, summary[k], flush=True)
    else:
        for k, (c, log) in runs.items():
            summary[k] = wait_measured(start(c, log, env))
            print(k, summary[k], flush=True)
    if "kiln" in summary:  # kiln's own per-layer figures (quantize --json)
        layers = json.loads((out / "kiln-quantize.log").read_text())["awq_layers"]
        summary["kiln"]["layer_cpu_s"] = [round(x["cpu_seconds"], 2) for x in layers]
        summary["kiln"]["layer_wall_s"] = [round(x["seconds"], 2) for x in layers]
    for k in ("kiln", "llmc"):  # reused results of an earlier run
        if k in skip and (out / "summary.json").exists():
            summary[k] = json.loads((out / "summary.json").read_text()).get(k)
    summary["load_mid"] = machine_load()

    # logits over the same eval tokens
    tokens_json = str(out / "eval_tokens.json")
    have_llmc = (out / "llmc-awq" / "config.json").exists()  # absent when its run was stopped (too slow to finish)
    hf_models = [("ref", sys.executable, a.hf)] + [("llmc", a.llmc_python, str(out / "llmc-awq"))] * have_llmc
    for name, py, model in hf_models:
        subprocess.run([py, me, "--child", "hf-logits", "--hf", model, "--tokens", tokens_json, "--ctx", str(a.ctx),
                        "--out", str(out / f"logits-{name}.safetensors")], check=True, env=env)
    for name, ws in (("kiln", out / "kiln-awq"), ("kiln-fp32", ws_fp)):
        subprocess.run([a.kiln, "eval", ws, "--tokens", tokens_json, "--ctx", str(a.ctx), "--kv-cache", "fp32",
                        "--save-logits", out / f"logits-{name}.safetensors"], check=True, stdout=subprocess.DEVNULL)
    ref = str(out / "logits-ref.safetensors")
    for name in ("kiln-fp32", "kiln", "llmc")[:3 if have_llmc else 2]:
        summary[f"quality_{name}"] = compare(ref, str(out / f"logits-{name}.safetensors"), a.ctx)
    summary["load_after"] = machine_load()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    k, m = summary.get("kiln"), summary.get("llmc")
    print(f"\nload: before {summary['load_before']}  mid {summary['load_mid']}  after {summary['load_after']}")
    print(f"{'':16} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'PPL':>8} {'KLD mean':>9} {'KLD p99':>8} {'top-1':>6}")
    q = summary["quality_kiln"]
    print(f"{'fp32 (ref)':16} {'':>8} {'':>8} {'':>12} {q['ppl_ref']:8.3f}")
    for name, t in (("kiln-fp32", None), ("kiln", k), ("llm-compressor", m))[:3 if have_llmc else 2]:
        q = summary["quality_" + ("llmc" if name == "llm-compressor" else name)]
        tt = f"{t['wall_s']:8.1f} {t['cpu_s']:8.1f} {t['peak_rss_gb']:12.3f}" if t else f"{'':>8} {'':>8} {'':>12}"
        print(f"{name:16} {tt} {q['ppl']:8.3f} {q['kld_mean']:9.4f} {q['kld_p99']:8.3f} {q['top1']:6.3f}")
    if k and m and have_llmc:
        print(f"kiln / llm-compressor: wall {k['wall_s'] / m['wall_s']:.2f}x, CPU {k['cpu_s'] / m['cpu_s']:.2f}x, "
              f"peak RSS {k['peak_rss_gb'] / m['peak_rss_gb']:.2f}x  (shared machine: compare CPU seconds)")


if __name__ == "__main__":
    main()
