"""Layer-streamed calibration and AWQ (docs/calibration.md "Layer streaming", docs/quantization.md).

Generated Llama checkpoints of the same shape with 4 and 16 layers (random weights, written with safetensors): the
peak RSS of `kiln calibrate` and `kiln quantize --method awq`, read from the kernel's rusage of the child process,
must not grow with the number of layers by as much as one layer's weights. Also: a missing tokenizer fails before any
weight is read, and the output does not depend on whether the calibration activations were spilled to disk."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import DATA, copy_tokenizer, kiln_binary, run_kiln

# Layers big enough (7 MB of fp32 weights each) that one layer stands out of the RSS noise of a binary that also maps
# the CUDA libraries (CI builds with CUDA; their pages add ~1-3 MB that vary from run to run).
HIDDEN, INTER, HEADS, VOCAB = 384, 1024, 6, 32000
LAYER_BYTES = 4 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)  # one decoder layer's linear weights, fp32
CALIB = DATA / "text" / "devils_dictionary_calib.txt"
# The quality report streams too (both models advance one layer at a time over the eval windows).
EVAL = ("--eval-text", DATA / "text" / "devils_dictionary_eval.txt", "--eval-ctx", 64, "--eval-tokens", 128)


def write_checkpoint(out, layers, tokenizer_from):
    out.mkdir()
    rng = np.random.default_rng(layers)
    w = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)
    t = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            t[p + f"self_attn.{n}_proj.weight"] = w(HIDDEN, HIDDEN)
        t[p + "mlp.gate_proj.weight"] = w(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = w(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = w(HIDDEN, INTER)
        t[p + "input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config))
    copy_tokenizer(tokenizer_from, out)


@pytest.fixture(scope="module")
def stacks(tmp_path_factory, fixture_models):
    root = tmp_path_factory.mktemp("layer_stream")
    ws = {}
    for layers in (4, 16):
        hf = root / f"hf{layers}"
        write_checkpoint(hf, layers, fixture_models / "llama-fp32-sharded")
        ws[layers] = root / f"ws{layers}"
        run_kiln("convert", hf, "-o", ws[layers])
    return root, ws


# The peak RSS of a kiln child, read with getrusage(RUSAGE_CHILDREN) in a small intermediate Python process: Linux
# carries the RSS high-water mark of the process that forks over into the child, so measuring a direct child of this
# test process (which holds the generated weights) would report this process's size.
MEASURE = ("import resource, subprocess, sys\n"
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)")


def measured(*args):
    """(exit code, stderr, peak RSS in bytes) of one kiln run."""
    p = subprocess.run([sys.executable, "-c", MEASURE, str(kiln_binary()), *map(str, args)], capture_output=True,
                       text=True, timeout=900)
    rss, rc = map(int, p.stdout.split())
    return rc, p.stderr, rss


def run_measured(*args):
    rc, err, rss = measured(*args)
    assert rc == 0, err
    return rss


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Small search grids keep this cheap; the memory held per layer does not depend on them.
AWQ = ("--method", "awq", "--group-size", 64, "--data", CALIB, "--samples", 2, "--seqlen", 64, "--awq-grid", 2,
       "--awq-loss-samples", 1, "--awq-no-clip", "--json")


def test_peak_rss_does_not_grow_with_layers(stacks):
    root, ws = stacks
    rss = {}
    for layers in (4, 16):
        rss["calibrate", layers] = run_measured("calibrate", ws[layers], "--data", CALIB, "--samples", 2, "--seqlen",
                                                64, "-o", root / f"stats{layers}.safetensors", "--json", "--force")
        rss["awq", layers] = run_measured("quantize", ws[layers], "-o", root / f"awq{layers}", *AWQ, *EVAL,
                                          "--force")
        rss["rtn", layers] = run_measured("quantize", ws[layers], "-o", root / f"rtn{layers}", "--method", "rtn",
                                          "--group-size", 64, *EVAL, "--force")
    for cmd in ("calibrate", "awq", "rtn"):
        grow = rss[cmd, 16] - rss[cmd, 4]
        # 12 more layers would add 12 layers' weights (85 MB) if anything were kept per layer.
        assert grow < LAYER_BYTES, f"{cmd}: peak RSS {rss[cmd, 4]} -> {rss[cmd, 16]} (+{grow} B, layer {LAYER_BYTES} B)"


def test_missing_tokenizer_fails_before_loading_weights(stacks, tmp_path):
    root, ws = stacks
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for f in ws[16].iterdir():
        if not f.name.startswith("tokenizer"):
            os.symlink(f, bare / f.name)
    model = sum(f.stat().st_size for f in ws[16].glob("*.safetensors"))
    # What the binary takes before it reads anything (its libraries: with CUDA, cuBLAS alone maps ~200 MB).
    rc, _, baseline = measured("--help")
    assert rc == 0
    for args in (("calibrate", bare, "--data", CALIB, "-o", tmp_path / "s.safetensors"),
                 ("quantize", bare, "-o", tmp_path / "q", *AWQ)):
        rc, err, rss = measured(*args)
        assert rc == 1 and "tokenizer" in err and len(err.strip().splitlines()) == 1, err
        assert rss - baseline < model / 4, (args[0], rss, baseline, model)
        assert not (tmp_path / "q").exists() and not (tmp_path / "s.safetensors").exists()


def test_spilled_and_repeated_runs_are_byte_identical(stacks, tmp_path):
    _, ws = stacks
    outs = []
    runs = ((), (), ("--max-memory", "64K"), ("--awq-inputs", "quantized"), ("--awq-inputs", "quantized"),
            ("--awq-inputs", "quantized", "--max-memory", "64K"))
    for i, extra in enumerate(runs):
        out = tmp_path / f"q{i}"
        summary = json.loads(run_kiln("quantize", ws[4], "-o", out, *AWQ, *extra).stdout)
        assert summary["awq_spilled"] == ("--max-memory" in extra)  # 2 x 64 x 256 floats are 128 KiB
        assert [layer["layer"] for layer in summary["awq_layers"]] == [0, 1, 2, 3]
        outs.append(out)
        assert not [p for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())  # spill file removed
    digests = [{p.name: sha(p) for p in o.iterdir()} for o in outs]
    assert digests[0] == digests[1] == digests[2]
    assert digests[3] == digests[4] == digests[5]
    # Quantized inputs change what layers 1.. are searched on, hence their weights.
    assert digests[0]["weights-00001-of-00001.safetensors"] != digests[3]["weights-00001-of-00001.safetensors"]
    assert json.loads((outs[3] / "kiln.json").read_text())["quantization"]["weights"]["awq"]["inputs"] == "quantized"
    stats = []
    for i, extra in enumerate(((), ("--max-memory", "64K"))):
        s = tmp_path / f"stats{i}.safetensors"
        report = json.loads(run_kiln("calibrate", ws[4], "--data", CALIB, "--samples", 4, "--seqlen", 64, "-o", s,
                                     "--json", *extra).stdout)
        assert report["spilled"] == bool(extra) and len(report["layers"]) == 4
        stats.append(sha(s))
    assert stats[0] == stats[1]
    assert not [p for p in tmp_path.iterdir() if "spill" in p.name]


def test_max_memory_is_validated(stacks, tmp_path):
    _, ws = stacks
    r = run_kiln("calibrate", ws[4], "--data", CALIB, "-o", tmp_path / "s.safetensors", "--max-memory", "lots",
                 check=False)
    assert r.returncode == 1 and "--max-memory 'lots'" in r.stderr, r.stderr
