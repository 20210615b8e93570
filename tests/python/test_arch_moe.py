"""Mixture-of-experts families (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE) against transformers'
native classes: tiny checkpoints written here (hidden 64, 2 layers, 4-8 experts, top-2), logits within 1e-3 in fp32,
32 greedy tokens identical, and the toolchain (generate, eval, RTN quantize, static INT8 KV, serve) on each."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                          Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from conftest import REPO, copy_tokenizer, convert_refused, run_kiln

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
TOL = 1e-3
COMMON = dict(vocab_size=32000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              num_experts_per_tok=2)
# name -> (config class, model class, config keys). Qwen2-MoE's second variant keeps layer 0 dense (mlp_only_layers)
# and renormalises the top-k; Qwen3-MoE's uses norm_topk_prob as Qwen3-30B-A3B does.
MODELS = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=64, num_local_experts=4)),
    "qwen2-moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       num_experts=8)),
    "qwen2-moe-dense0": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                         dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                              num_experts=4, mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=16,
                       norm_topk_prob=True)),
}


@pytest.fixture(scope="module")
def checkpoints(fixture_models, tmp_path_factory):
    """name -> an HF checkpoint directory, written by the native class with random weights (routers scaled up so
    that routing is decisive rather than near-uniform) and a fixture's tokenizer."""
    root = tmp_path_factory.mktemp("moe_hf")
    out = {}
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(MODELS.items()):
        torch.manual_seed(100 + i)
        model = model_cls(cfg_cls(**COMMON, **extra)).float()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("gate.weight") and "shared_expert" not in n and "gate_proj" not in n:
                    p.mul_(8.0)
        model.save_pretrained(root / name)
        copy_tokenizer(fixture_models / "llama-fp32-sharded", root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def workspaces(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_ws")
    out = {}
    for name, src in checkpoints.items():
        run_kiln("convert", src, "-o", root / name)
        out[name] = root / name
    return out


def token_ids(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(3, 31000, size=n)]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).float().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(name, checkpoints, workspaces, tmp_path):
    ids = token_ids(64, seed=len(name))
    tok, out = tmp_path / "t.json", tmp_path / "l.safetensors"
    tok.write_text(json.dumps(ids))
    run_kiln("eval", workspaces[name], "--tokens", tok, "--ctx", len(ids), "--save-logits", out, "--kv-cache", "fp32")
    ours = load_file(str(out))["logits"].numpy()
    with torch.no_grad():
        ref = hf_model(checkpoints[name])(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(name, checkpoints, workspaces, tmp_path):
    prompt = token_ids(12, seed=7 + len(name))
    with torch.no_grad():
        hf = hf_model(checkpoints[name]).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                                                   min_new_tokens=32, pad_token_id=0)[0, len(prompt):].tolist()
    tok = tmp_path / "p.json"
    tok.write_text(json.dumps(prompt))
    res = json.loads(run_kiln("generate", workspaces[name], "--tokens", tok, "-n", 32, "--kv-cache", "fp32",
                              "--ignore-eos", "--json").stdout)
    assert res["token_ids"] == hf


def test_workspace_records_the_routing(workspaces):
    spec = json.loads((workspaces["qwen2-moe-dense0"] / "kiln.json").read_text())["model"]
    assert spec["moe"] == {"experts": 4, "top_k": 2, "intermediate_size": 32, "renormalize": True,
                           "shared_intermediate_size": 64, "layers": [False, True]}
    assert json.loads((workspaces["mixtral"] / "kiln.json").read_text())["model"]["moe"]["renormalize"] is True
    assert json.loads((workspaces["qwen2-moe"] / "kiln.json").read_text())["model"]["moe"]["renormalize"] is False
    shown = run_kiln("inspect", workspaces["qwen2-moe"]).stdout
    assert "experts        8, top-2, expert ffn 32, shared expert ffn 64" in shown, shown


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe-dense0", "qwen3-moe"])
def test_generate_eval_and_rtn(name, workspaces, tmp_path):
    ws = workspaces[name]
    gen = json.loads(run_kiln("generate", ws, "--prompt", "The fox", "-n", 6, "--json").stdout)
    assert gen["completion_tokens"] >= 1
    text = tmp_path / "eval.txt"
    text.write_text(EVAL.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    q = tmp_path / "q"
    r = json.loads(run_kiln("quantize", ws, "-o", q, "--method", "rtn", "--group-size", 32, "--eval-text", text,
                            "--eval-ctx", 64, "--json").stdout)
    run_kiln("verify", q)
    assert r["quality"]["kld_mean"] < 0.5, r["quality"]
    modules = json.loads((q / "kiln.json").read_text())["quantization"]["weights"]["modules"]
    assert "ffn.experts.gate_up" in modules and "ffn.experts.down" in modules
    names = load_file(str(next(q.glob("weights-*.safetensors"))))
    assert "layers.1.ffn.experts.1.down.qweight" in names and "layers.1.ffn.router.weight" in names
    r = run_kiln("export", q, "--format", "autoawq", "-o", tmp_path / "aa", check=False)
    assert r.returncode == 1 and "mixture-of-experts" in r.stderr and not (tmp_path / "aa").exists()
    r = run_kiln("export", q, "--format", "gguf", "-o", tmp_path / "x.gguf", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.gguf").exists()
    base = json.loads(run_kiln("eval", ws, "--text", text, "--ctx", 64, "--json").stdout)
    quant = json.loads(run_kiln("eval", q, "--text", text, "--ctx", 64, "--json").stdout)
    assert np.isfinite(base["ppl"]) and np.isfinite(quant["ppl"])


def test_static_int8_kv_and_serve(workspaces, tmp_path):
    """Calibration sees every layer's K/V through the MoE blocks; static INT8 KV stays close to fp32; kiln serve
    (continuous batching over the ragged batch) answers the openai client with what kiln generate produces."""
    from test_serve import Server, generate
    ws, stats, ref, q = workspaces["qwen2-moe"], tmp_path / "s.safetensors", tmp_path / "ref.safetensors", tmp_path / "q"
    eval_args = ["--text", EVAL, "--ctx", 128, "--max-tokens", 384]
    run_kiln("calibrate", ws, "--data", CALIB, "--samples", 8, "--seqlen", 64, "-o", stats)
    run_kiln("eval", ws, *eval_args, "--kv-cache", "fp32", "--save-logits", ref)
    run_kiln("quantize", ws, "-o", q, "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
             "--kv-stats", stats)
    rep = json.loads(run_kiln("eval", q, *eval_args, "--ref-logits", ref, "--json").stdout)
    assert rep["kv_cache"] == "int8-static" and 0 < rep["kld_mean"] < 1e-3, rep
    server = Server(ws)
    try:
        # Concurrent requests share the engine's ragged batches (one's prefill beside another's decode), so each
        # expert runs over rows of several sequences at once; every answer must still be the one generated alone.
        from concurrent.futures import ThreadPoolExecutor
        prompts = ["Once upon a time", "The fox", "In the beginning the", "A"]
        want = [generate(ws, p, 12)["text"] for p in prompts]
        client = server.client()
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                                    temperature=0).choices[0].text, prompts))
        assert got == want
    finally:
        server.stop()




@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("mlp_only_layers", [0, 5], "mlp_only_layers"),
    ("decoder_sparse_step", 3, "decoder_sparse_step"),
    ("num_experts", 0, "num_experts"),
])
def test_bad_routing_config_is_refused(key, value, needle, checkpoints, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(checkpoints["qwen2-moe"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    assert needle in convert_refused(src, tmp_path)


def test_missing_or_misshapen_expert_is_refused(checkpoints, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(checkpoints["mixtral"], src)
    st = load_file(str(src / "model.safetensors"))
    st["model.layers.1.block_sparse_moe.experts.2.w3.weight"] = st[
        "model.layers.1.block_sparse_moe.experts.2.w3.weight"][:40].contiguous()
    save_file(st, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in convert_refused(src, tmp_path)
    del st["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(st, str(src / "model.safetensors"), metadata={"format": "pt"})
    line = convert_refused(src, tmp_path)
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in line and "missing" in line


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe-dense0"])
def test_awq_folding_is_exact(name, workspaces, tmp_path):
    """--awq-fold-only folds the searched scales without quantizing: ffn_norm divided, the router's, every expert's
    gate_up, the shared expert's and its gate's columns multiplied, each expert's up rows divided and down columns
    multiplied. The logits must not move."""
    from safetensors.numpy import load_file as load_np
    ws, folded = workspaces[name], tmp_path / "folded"
    run_kiln("quantize", ws, "-o", folded, "--method", "awq", "--group-size", 32, "--awq-fold-only", "--data", CALIB,
             "--samples", 8, "--seqlen", 32, "--seed", 1)
    for w in (ws, folded):
        run_kiln("eval", w, "--text", EVAL, "--ctx", 64, "--max-tokens", 256, "--save-logits",
                 tmp_path / f"{w.name}.safetensors")
    ref, got = load_np(str(tmp_path / f"{ws.name}.safetensors")), load_np(str(tmp_path / "folded.safetensors"))
    a, b = load_np(str(next(ws.glob("weights-*.safetensors")))), load_np(str(next(folded.glob("weights-*.safetensors"))))
    for t in ("layers.1.ffn_norm.weight", "layers.1.ffn.router.weight", "layers.1.ffn.experts.0.down.weight"):
        assert not np.array_equal(a[t], b[t]), t  # scales were folded
    assert np.abs(ref["logits"] - got["logits"]).max() < 1e-4


@pytest.fixture(scope="module")
def outlier_moe(fixture_models, tmp_path_factory):
    """A Qwen2-MoE whose attention and MLP input norms carry 3 outlier channels (40x)."""
    torch.manual_seed(5)
    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                         num_experts=4)
    model = Qwen2MoeForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 40.0
            layer.mlp.gate.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("moe_outliers") / "hf"
    model.save_pretrained(out)
    copy_tokenizer(fixture_models / "llama-fp32-sharded", out)
    ws = out.parent / "ws"
    run_kiln("convert", out, "-o", ws, "--dtype", "fp32")
    return ws


def test_awq_beats_rtn(outlier_moe, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(EVAL.read_text(encoding="utf-8")[:6000], encoding="utf-8")

    def quantize(out, method, *extra):
        r = run_kiln("quantize", outlier_moe, "-o", out, "--method", method, "--group-size", 32, "--eval-text", text,
                     "--eval-ctx", 128, "--json", *extra)
        return json.loads(r.stdout)["quality"], r.stderr

    rtn, _ = quantize(tmp_path / "rtn", "rtn")
    awq, _ = quantize(tmp_path / "awq", "awq", "--data", CALIB, "--samples", 16, "--seqlen", 64, "--seed", 1)
    print("RTN", rtn, "\nAWQ", awq)
    assert awq["kld_mean"] < 0.7 * rtn["kld_mean"], (awq, rtn)


def test_awq_reports_experts_without_tokens_and_quantizes_them_rtn(workspaces, tmp_path):
    """One calibration block of 2 tokens reaches at most 4 of the 8 experts of each layer (top-2): the others get a
    note, are listed in kiln.json, and are quantized RTN; the workspace is complete and runs."""
    q = tmp_path / "q"
    r = run_kiln("quantize", workspaces["qwen2-moe"], "-o", q, "--method", "awq", "--group-size", 32, "--data", CALIB,
                 "--samples", 1, "--seqlen", 2, "--seed", 3)
    alpha = json.loads((q / "kiln.json").read_text())["quantization"]["weights"]["awq"]["alpha"]
    for layer, a in enumerate(alpha):
        assert len(a["idle_experts"]) >= 4, a
        for e in a["idle_experts"]:
            assert f"layer {layer} expert {e} received no calibration tokens; it is quantized RTN" in r.stderr
    run_kiln("verify", q)
    assert json.loads(run_kiln("generate", q, "--prompt", "The fox", "-n", 4, "--json").stdout)["completion_tokens"]
    # kiln calibrate reports them too, in its report and on stderr.
    r = run_kiln("calibrate", workspaces["qwen2-moe"], "--data", CALIB, "--samples", 1, "--seqlen", 2, "--seed", 3,
                 "-o", tmp_path / "s.safetensors", "--json")
    idle = json.loads(r.stdout)["idle_experts"]
    assert idle == [f"layers.{i}.ffn.experts.{e}" for i, a in enumerate(alpha) for e in a["idle_experts"]]
    assert all(f"{name} received no calibration tokens" in r.stderr for name in idle)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_cuda_backend_matches_cpu(name, workspaces, tmp_path):
    """The MoE ops on the CUDA backend (router top-k, gather, weighted scatter-add, shared-expert gate) over a whole
    evaluation window and a batched greedy run, against the CPU backend."""
    import os
    from test_cuda_cli import cuda_devices
    if not cuda_devices():
        pytest.skip("no CUDA device")
    ids = token_ids(96, seed=11)
    tok = tmp_path / "t.json"
    tok.write_text(json.dumps(ids))
    logits = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.safetensors"
        run_kiln("eval", workspaces[name], "--tokens", tok, "--ctx", 96, "--save-logits", out, "--kv-cache", "fp32",
                 env=dict(os.environ, KILN_DEVICE=device))
        logits[device] = load_file(str(out))["logits"].numpy()
    assert np.abs(logits["cpu"] - logits["cuda"]).max() < 1e-3
