"""Architectures beyond the Llama family (GPT-2, Gemma 2/3, GLM-4, GLM-4-0414, Phi-3) through the whole toolchain,
and the convert-time refusals of configs that contradict their tensors or ask for what kiln does not implement.
Logits/greedy parity against transformers is in test_runtime.py (PARITY, GREEDY); batch invariance and KV reuse in
tests/unit/test_runtime_model.cpp.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import copy_tokenizer, REPO, convert_refused, run_kiln

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
FAMILIES = ["gpt2-fp32", "gemma2-fp32", "gemma3-fp32", "glm-fp32", "glm4-fp32", "phi3-fp32"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(EVAL.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return p


def copy_fixture(fixture_models, name, dst):
    shutil.copytree(fixture_models / name, dst)
    return dst




def test_gpt2_c_attn_width_contradicting_config_is_refused(fixture_models, tmp_path):
    src = copy_fixture(fixture_models, "gpt2-fp32", tmp_path / "src")
    st = load_file(str(src / "model.safetensors"))
    st["transformer.h.1.attn.c_attn.weight"] = st["transformer.h.1.attn.c_attn.weight"][:, :190].contiguous()
    st["transformer.h.1.attn.c_attn.bias"] = st["transformer.h.1.attn.c_attn.bias"][:190].contiguous()
    save_file(st, str(src / "model.safetensors"), metadata={"format": "pt"})
    line = convert_refused(src, tmp_path)
    assert "transformer.h.1.attn.c_attn.weight" in line and "n_embd = 64" in line and "[64, 192]" in line, line


@pytest.mark.parametrize("name,key,value,needle", [
    ("phi3-fp32", "rope_parameters", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                      "long_factor": [1.0] * 8}, "longrope"),
    ("gpt2-fp32", "activation_function", "relu", "activation_function"),
    ("gpt2-fp32", "scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("gemma2-fp32", "layer_types", ["sliding_attention", "chunked_attention"], "layer_types"),
    ("glm-fp32", "partial_rotary_factor", 0.0, "partial_rotary_factor"),
])
def test_unsupported_variants_are_refused_at_convert(name, key, value, needle, fixture_models, tmp_path):
    src = copy_fixture(fixture_models, name, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    if key == "partial_rotary_factor" and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"][key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    line = convert_refused(src, tmp_path)
    assert needle in line, line


def test_gpt2_checkpoint_without_transformer_prefix(fixture_models, tmp_path):
    """Hub GPT-2 checkpoints name tensors h.0.attn... without "transformer."; both layouts convert to the same."""
    src = copy_fixture(fixture_models, "gpt2-fp32", tmp_path / "src")
    st = load_file(str(src / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in st.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    a, b = tmp_path / "a", tmp_path / "b"
    run_kiln("convert", fixture_models / "gpt2-fp32", "-o", a)
    run_kiln("convert", src, "-o", b)
    for f in sorted(a.glob("weights-*.safetensors")):
        assert f.read_bytes() == (b / f.name).read_bytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_eval_and_rtn(name, fixture_models, eval_text, tmp_path):
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / name, "-o", ws)
    info = json.loads(run_kiln("inspect", ws, "--json").stdout)
    assert info["model"]["architecture"] == json.loads((fixture_models / name / "config.json").read_text())[
        "architectures"][0]
    gen = json.loads(run_kiln("generate", ws, "--prompt", "The fox", "-n", 6, "--json").stdout)
    assert gen["completion_tokens"] >= 1
    base = json.loads(run_kiln("eval", ws, "--text", eval_text, "--ctx", 64, "--json").stdout)
    assert np.isfinite(base["ppl"]) and base["n_tokens"] > 0
    q = tmp_path / "q"
    r = json.loads(run_kiln("quantize", ws, "-o", q, "--method", "rtn", "--group-size", 32, "--eval-text",
                            eval_text, "--eval-ctx", 64, "--json").stdout)
    run_kiln("verify", q)
    # Random 64-wide models: 4-bit weights move the distribution a little, never wildly (a mis-wired int4 linear gives
    # KL > 1). Their near-flat distributions make top-1 agreement noise, so it is not checked.
    assert r["quality"]["kld_mean"] < 0.5, r["quality"]
    doc = json.loads((q / "kiln.json").read_text())
    expect = ["attn.qkv", "attn.o", "ffn.up" if name.startswith("gpt2") else "ffn.gate_up", "ffn.down"]
    assert doc["quantization"]["weights"]["modules"] == expect


@pytest.fixture(scope="module")
def gpt2_outliers(fixture_models, tmp_path_factory):
    """A GPT-2 (no GQA, LayerNorm with bias, plain GELU MLP) with outlier channels in ln_1 and ln_2."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32000, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.08,
                     bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).float()
    with torch.no_grad():
        for block in model.transformer.h:
            for ln in (block.ln_1, block.ln_2):
                ln.weight[[3, 17, 40]] *= 40.0
                ln.bias.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("gpt2-awq") / "hf"
    model.save_pretrained(out)
    copy_tokenizer(fixture_models / "gpt2-fp32", out)
    return out


def test_gpt2_awq_beats_rtn_and_is_deterministic(gpt2_outliers, eval_text, tmp_path):
    ws = tmp_path / "ws"
    run_kiln("convert", gpt2_outliers, "-o", ws, "--dtype", "fp32")

    def quality(out, method, *extra):
        r = run_kiln("quantize", ws, "-o", out, "--method", method, "--group-size", 32, "--eval-text", eval_text,
                     "--eval-ctx", 128, "--json", *extra)
        return json.loads(r.stdout)["quality"]

    cal = ("--data", CALIB, "--samples", 16, "--seqlen", 64, "--seed", 1)
    rtn = quality(tmp_path / "rtn", "rtn")
    awq = quality(tmp_path / "awq", "awq", *cal)
    print("RTN", rtn, "\nAWQ", awq)
    assert awq["kld_mean"] < 0.7 * rtn["kld_mean"], (awq, rtn)
    again = quality(tmp_path / "awq2", "awq", *cal)
    assert again == awq
    for f in sorted((tmp_path / "awq").glob("weights-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "awq2" / f.name).read_bytes()
    alpha = json.loads((tmp_path / "awq" / "kiln.json").read_text())["quantization"]["weights"]["awq"]["alpha"]
    assert all(layer["up->down"] is None for layer in alpha)  # GELU between up and down: not smoothed
    # Folding alone (LayerNorm weight and bias divided, qkv / up columns multiplied, v rows and o columns) leaves the
    # model's logits unchanged.
    folded = tmp_path / "fold"
    run_kiln("quantize", ws, "-o", folded, "--method", "awq", "--group-size", 32, "--awq-fold-only", *cal)
    run_kiln("eval", ws, "--text", eval_text, "--ctx", 128, "--save-logits", tmp_path / "ref.safetensors")
    run_kiln("eval", folded, "--text", eval_text, "--ctx", 128, "--save-logits", tmp_path / "fold.safetensors")
    from safetensors.numpy import load_file as load_np
    ref, got = load_np(str(tmp_path / "ref.safetensors")), load_np(str(tmp_path / "fold.safetensors"))
    assert np.abs(ref["logits"] - got["logits"]).max() < 1e-4


@pytest.mark.parametrize("name", ["gemma2-fp32", "gemma3-fp32", "glm4-fp32", "phi3-fp32"])
def test_awq_folding_is_exact_for_each_family(name, fixture_models, eval_text, tmp_path):
    """--awq-fold-only folds the searched scales into unquantized weights, through each family's graph: Gemma's
    (1 + w) norms take (1 + w) / s - 1, the post-norms sit after o and down, GLM's biases and partial RoPE, Phi-3's
    fused tensors. The logits must not move."""
    ws, folded = tmp_path / "ws", tmp_path / "folded"
    run_kiln("convert", fixture_models / name, "-o", ws, "--dtype", "fp32")
    run_kiln("quantize", ws, "-o", folded, "--method", "awq", "--group-size", 32, "--awq-fold-only", "--data", CALIB,
             "--samples", 8, "--seqlen", 32, "--seed", 1)
    from safetensors.numpy import load_file as load_np
    for w in (ws, folded):
        run_kiln("eval", w, "--text", eval_text, "--ctx", 64, "--save-logits", tmp_path / f"{w.name}.safetensors")
    ref, got = load_np(str(tmp_path / "ws.safetensors")), load_np(str(tmp_path / "folded.safetensors"))
    a, b = load_np(str(next(ws.glob("weights-*.safetensors")))), load_np(str(next(folded.glob("weights-*.safetensors"))))
    assert not np.array_equal(a["layers.0.attn_norm.weight"], b["layers.0.attn_norm.weight"])  # scales were folded
    assert np.abs(ref["logits"] - got["logits"]).max() < 1e-4


@pytest.mark.parametrize("name", ["gpt2-fp32", "gemma3-fp32", "glm4-fp32"])
def test_static_int8_kv_and_serve(name, fixture_models, tmp_path):
    """Calibration's K/V observer and the static INT8 KV cache through each family's attention (GPT-2 without RoPE,
    Gemma 3 with q/k norms and a local RoPE base, GLM-4 with partial interleaved RoPE), then `kiln serve` answering
    the official openai client with exactly what `kiln generate` produces."""
    from test_serve import assert_serve_matches_generate
    ws, stats, ref, q = tmp_path / "ws", tmp_path / "stats.safetensors", tmp_path / "ref.safetensors", tmp_path / "q"
    eval_args = ["--text", EVAL, "--ctx", 128, "--max-tokens", 384]
    run_kiln("convert", fixture_models / name, "-o", ws)
    run_kiln("calibrate", ws, "--data", CALIB, "--samples", 8, "--seqlen", 64, "-o", stats)
    run_kiln("eval", ws, *eval_args, "--kv-cache", "fp32", "--save-logits", ref)
    run_kiln("quantize", ws, "-o", q, "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
             "--kv-stats", stats)
    rep = json.loads(run_kiln("eval", q, *eval_args, "--ref-logits", ref, "--json").stdout)
    assert rep["kv_cache"] == "int8-static" and 0 < rep["kld_mean"] < 1e-3, rep
    assert_serve_matches_generate(ws)


def outlier_checkpoint(cls_cfg, cls_model, dst, **cfg):
    """A 2-layer model of a Llama-like family (no GQA) whose attention and MLP input norms have 3 outlier channels
    scaled 40x (for (1 + w) norms, the effective weight), so qkv and gate_up inputs carry outliers."""
    torch.manual_seed(0)
    config = cls_cfg(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, initializer_range=0.08,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, **cfg)
    model = cls_model(config).float()
    plus_one = cls_cfg.__name__.startswith("Gemma")
    with torch.no_grad():
        for layer in model.model.layers:
            mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
            for norm in (layer.input_layernorm, mlp_norm):
                idx = [3, 17, 40]
                norm.weight[idx] = (40.0 * (1.0 + norm.weight[idx]) - 1.0) if plus_one else norm.weight[idx] * 40.0
    model.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("family", ["gemma2", "glm4", "phi3"])
def test_awq_beats_rtn_on_outliers(family, fixture_models, eval_text, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Glm4Config, Glm4ForCausalLM, Phi3Config, Phi3ForCausalLM
    classes = {"gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=16, query_pre_attn_scalar=16)),
               "glm4": (Glm4Config, Glm4ForCausalLM, dict(head_dim=16)),
               "phi3": (Phi3Config, Phi3ForCausalLM, {})}
    cfg_cls, model_cls, extra = classes[family]
    src = outlier_checkpoint(cfg_cls, model_cls, tmp_path / "hf", **extra)
    copy_tokenizer(fixture_models / "gpt2-fp32", src)
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")

    def quality(out, method, *extra_args):
        r = run_kiln("quantize", ws, "-o", out, "--method", method, "--group-size", 32, "--eval-text", eval_text,
                     "--eval-ctx", 128, "--json", *extra_args)
        return json.loads(r.stdout)["quality"]

    rtn = quality(tmp_path / "rtn", "rtn")
    awq = quality(tmp_path / "awq", "awq", "--data", CALIB, "--samples", 16, "--seqlen", 64, "--seed", 1)
    print(family, "RTN", rtn, "\nAWQ", awq)
    assert awq["kld_mean"] < 0.7 * rtn["kld_mean"], (awq, rtn)


def test_bench_offline_reports_batched_vs_one_by_one_on_gpt2(fixture_models, tmp_path):
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / "gpt2-fp32", "-o", ws)
    out = run_kiln("bench", "offline", ws, "-n", 8, "--input-len", 16, "--output-len", 8, "-c", "1,4").stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("offline")]
    tps = {int(r[1]): float(r[6]) for r in rows}  # conc -> out tok/s
    ratio = [line for line in out.splitlines() if line.startswith("batched vs one-by-one")]
    assert len(ratio) == 1, out
    got = float(ratio[0].split("c=4 ")[1].rstrip("x"))
    assert got == pytest.approx(tps[4] / tps[1], rel=0.02, abs=0.01), out


@pytest.mark.parametrize("name, version", [("llama-fp32-sharded", 1), ("phi3-fp32", 1), ("gpt2-fp32", 2),
                                           ("gemma2-fp32", 2), ("glm-fp32", 2), ("phi3-partial-bf16-sharded", 2)])
def test_format_version_marks_layer_graph_fields(name, version, fixture_models, tmp_path):
    """A kiln older than the layer graph reads format_version 1 only; a model it would run wrong must not say 1."""
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / name, "-o", ws)
    doc = json.loads((ws / "kiln.json").read_text())
    assert doc["format_version"] == version, doc["model"]
    q = tmp_path / "q"
    run_kiln("quantize", ws, "-o", q, "--method", "rtn", "--group-size", 32)
    assert json.loads((q / "kiln.json").read_text())["format_version"] == version
