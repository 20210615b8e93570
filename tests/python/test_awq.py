"""kiln quantize --method awq (docs/quantization.md, AWQ).

- On a transformers-written model with activation-outlier channels (a few channels of the attention and FFN norm
  weights scaled 40x, so the inputs of qkv and gate_up carry outliers), AWQ's KL divergence against the unquantized
  model is clearly below RTN's at the same group size on the same held-out tokens.
- --awq-fold-only folds the searched scales into unquantized weights: logits equal the original within 1e-4, which
  proves the folding (norm / preceding-linear division, following-linear multiplication, biases) is exact.
- The block losses of the attn_norm -> qkv and ffn_norm -> gate_up searches (--awq-dump): the cached block inputs
  equal transformers' q_proj / MLP inputs on the same tokens, and the losses recorded for plain RTN and for the chosen
  scales equal the MSE of transformers' self-attention / MLP output when only q, k, v (or gate, up) are replaced by
  RTN(W diag(s)) diag(1/s) (the int4 formula in numpy from test_quantize), relative tolerance 1e-3.
- Determinism, kiln.json contents, and the error cases of the options and the data.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import copy_tokenizer, REPO, run_kiln
from test_quantize import ref_dequantize, ref_quantize

GS = 32
CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
CAL_ARGS = ("--data", CALIB, "--samples", 16, "--seqlen", 64, "--seed", 1)


@pytest.fixture(scope="module")
def outlier_checkpoint(fixture_models, tmp_path_factory):
    """A 2-layer Llama without GQA (so v -> o is smoothed too), written by transformers, with outlier channels."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      initializer_range=0.08, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 40.0
    out = tmp_path_factory.mktemp("awq") / "hf"
    model.save_pretrained(out)
    copy_tokenizer(fixture_models / "llama-fp32-sharded", out)
    return out


@pytest.fixture(scope="module")
def ws(outlier_checkpoint, fixture_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("awq-ws")
    cache = {}

    def get(name):
        if name not in cache:
            src = outlier_checkpoint if name == "outlier" else fixture_models / name
            run_kiln("convert", src, "-o", root / name, "--dtype", "fp32")
            cache[name] = root / name
        return cache[name]
    return get


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    # A slice of the held-out text: whole-text logits of a 32000-token vocabulary would be gigabytes.
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(EVAL.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return p


def weights(path):
    out = {}
    for f in sorted(Path(path).glob("weights-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tree_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def quality(ws_path, out, method, eval_text, *extra):
    r = run_kiln("quantize", ws_path, "-o", out, "--method", method, "--group-size", GS, "--eval-text", eval_text,
                 "--eval-ctx", 128, "--json", *extra)
    return json.loads(r.stdout)["quality"]


@pytest.mark.parametrize("loss", ["block", "linear"])
def test_awq_beats_rtn_on_outlier_activations(loss, ws, eval_text, tmp_path):
    src = ws("outlier")
    rtn = quality(src, tmp_path / "rtn", "rtn", eval_text)
    awq = quality(src, tmp_path / "awq", "awq", eval_text, *CAL_ARGS, "--awq-loss", loss)
    print("RTN", rtn, "\nAWQ", awq)
    assert awq["kld_mean"] < 0.7 * rtn["kld_mean"], (awq, rtn)
    assert awq["top1_agreement"] >= rtn["top1_agreement"] - 0.01
    doc = json.loads((tmp_path / "awq" / "kiln.json").read_text())
    w = doc["quantization"]["weights"]
    assert w["method"] == "awq" and w["bits"] == 4 and w["group_size"] == GS
    a = w["awq"]
    assert a["data_sha256"] == hashlib.sha256(CALIB.read_bytes()).hexdigest()
    assert a["samples"] == 16 and a["seqlen"] == 64 and a["seed"] == 1 and a["blocks"] == 16
    assert len(a["alpha"]) == 2
    assert a["loss"] == loss and a["loss_blocks"] == (8 if loss == "block" else 0)
    for layer in a["alpha"]:
        for k in ("attn_norm->qkv", "v->o", "ffn_norm->gate_up", "up->down"):
            assert 0 <= layer[k] < 1  # no GQA here, so v -> o is smoothed
    # The quantized workspace runs through the ordinary runtime.
    run_kiln("verify", tmp_path / "awq")


def fake_quant(w, s):
    """RTN(W diag(s)) diag(1/s) in float32, the stand-in the search evaluates."""
    w = w.detach().numpy().astype(np.float32)
    return torch.from_numpy(ref_dequantize(*ref_quantize(w * s, GS), GS) / s)


@pytest.mark.parametrize("name", ["outlier", "llama-bias-linear-rope", "qwen3-fp32", "mistral-fp32-sharded"])
def test_block_loss_matches_transformers(name, ws, fixture_models, outlier_checkpoint, tmp_path):
    dump = tmp_path / "dump.safetensors"
    # 3 of the 16 blocks, 2 blocks per batch: the losses also cover a batch holding fewer sequences than the others.
    # --awq-inputs fp (the default): every layer's cached inputs come from the unquantized model, as in transformers.
    run_kiln("quantize", ws(name), "-o", tmp_path / "q", "--method", "awq", "--group-size", GS, *CAL_ARGS,
             "--awq-loss-samples", 3, "--batch-tokens", 128, "--awq-dump", dump, "--awq-inputs", "fp")
    d = load_file(str(dump))
    tokens = torch.from_numpy(d["tokens"].astype(np.int64))
    assert tokens.shape == (3, 64)
    hf = outlier_checkpoint if name == "outlier" else fixture_models / name
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").float().eval()
    layers = model.model.layers
    seen = {}

    def keep(key, value):
        seen[key] = value.detach().reshape(-1, value.shape[-1]).clone()
    for i, layer in enumerate(layers):
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a, i=i: keep(("attn_in", i), a[0]))
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: keep(("mlp_in", i), a[0]))
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: keep(("attn", i), out[0]))
        layer.mlp.register_forward_hook(lambda m, a, out, i=i: keep(("mlp", i), out))

    def run():
        with torch.no_grad():
            model(input_ids=tokens)
        return dict(seen)
    ref = run()
    for i, layer in enumerate(layers):
        for key, block, linears in (("attn", layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                    ("mlp", layer.mlp, ("gate_proj", "up_proj"))):
            x = d[f"layers.{i}.{key}_input"]
            want = ref[(f"{key}_in", i)].numpy()
            assert np.abs(x - want).max() < 1e-4 * max(1.0, np.abs(want).max()), (name, i, key)
            s = d[f"layers.{i}.{key}_scales"]
            losses = d[f"layers.{i}.losses"][0 if key == "attn" else 1]  # [rtn, chosen]
            originals = [getattr(block, n).weight.data.clone() for n in linears]
            for scales, kiln_loss in ((np.ones_like(s), losses[0]), (s, losses[1])):
                for n, w in zip(linears, originals):
                    getattr(block, n).weight.data = fake_quant(w, scales)
                got = run()[(key, i)]
                oracle = float(((got.double() - ref[(key, i)].double()) ** 2).mean())
                assert kiln_loss == pytest.approx(oracle, rel=1e-3), (name, i, key, kiln_loss, oracle)
            for n, w in zip(linears, originals):
                getattr(block, n).weight.data = w


@pytest.mark.parametrize("name", ["outlier", "llama-fp32-sharded", "qwen2-tied-fp32"])
def test_fold_only_is_exact(name, ws, eval_text, tmp_path):
    src = ws(name)
    folded = tmp_path / "folded"
    run_kiln("quantize", src, "-o", folded, "--method", "awq", "--group-size", GS, "--awq-fold-only", *CAL_ARGS)
    doc = json.loads((folded / "kiln.json").read_text())
    assert doc["quantization"]["weights"]["method"] == "none"
    assert doc["quantization"]["weights"]["awq"]["fold_only"] is True
    gqa = name != "outlier"
    assert all((layer["v->o"] is None) == gqa for layer in doc["quantization"]["weights"]["awq"]["alpha"])
    a, b = weights(src), weights(folded)
    assert a.keys() == b.keys()
    assert not np.array_equal(a["layers.0.attn_norm.weight"], b["layers.0.attn_norm.weight"])  # scales were folded
    # 256 tokens: Qwen's 151936-entry vocabulary makes each token's logits 0.6 MB
    ev = ("--text", eval_text, "--ctx", 128, "--max-tokens", 256)
    run_kiln("eval", src, *ev, "--save-logits", tmp_path / "ref.safetensors")
    run_kiln("eval", folded, *ev, "--save-logits", tmp_path / "fold.safetensors")
    ref, got = load_file(str(tmp_path / "ref.safetensors")), load_file(str(tmp_path / "fold.safetensors"))
    np.testing.assert_array_equal(ref["tokens"], got["tokens"])
    assert np.abs(ref["logits"] - got["logits"]).max() < 1e-4


def test_deterministic(ws, tmp_path):
    src = ws("llama-fp32-sharded")
    for d in ("a", "b"):
        run_kiln("quantize", src, "-o", tmp_path / d, "--method", "awq", "--group-size", GS, *CAL_ARGS)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_errors(ws, tmp_path):
    src = ws("llama-fp32-sharded")
    out = tmp_path / "out"

    def fails(*args):
        r = run_kiln("quantize", src, "-o", out, "--group-size", GS, *args, check=False)
        assert r.returncode != 0
        assert not out.exists()
        return r.stderr

    assert "--data" in fails("--method", "awq")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty.txt" in fails("--method", "awq", "--data", empty)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    assert "short.txt" in fails("--method", "awq", "--data", short, "--seqlen", 512)
    assert "group" in fails("--method", "awq", "--data", CALIB, "--samples", 2, "--seqlen", 16,
                            "--group-size", 48).lower()
    assert "--data" in fails("--method", "rtn", "--data", CALIB)
    assert "missing.txt" in fails("--method", "awq", "--data", tmp_path / "missing.txt")
    assert "--awq-loss-samples" in fails("--method", "awq", "--data", CALIB, "--awq-loss-samples", 0)
    assert "--awq-dump" in fails("--method", "awq", "--data", CALIB, "--awq-loss", "linear", "--awq-dump",
                                 tmp_path / "d.safetensors")
    assert "--awq-dump" in fails("--method", "rtn", "--awq-dump", tmp_path / "d.safetensors")
