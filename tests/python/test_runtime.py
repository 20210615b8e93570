"""The CPU runtime against transformers (fp32, CPU torch) on the tiny fixture checkpoints.

Tolerance: kiln computes every op in fp32 with fp32 accumulation, as transformers does in fp32; the two differ only in
summation order and in exp/cos/sin implementations, which moves logits by ~1e-6..1e-5 on these 2-layer models. We
assert max |diff| <= 1e-3, which is 100x that noise yet far below any real bug (a wrong rope variant, mask or bias
moves logits by >1e-2). bf16 workspaces hold exactly the weights transformers sees after `.float()`, so the same bound
holds when the KV cache is fp32; with the default bf16 KV cache the error is that of bf16 rounding of K/V, checked with
a KL bound instead.
"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from conftest import run_kiln

TOL = 1e-3

# fixture -> sequence length: long enough to exercise each variant (dynamic NTK beyond max_position_embeddings=256,
# llama3 beyond original_max_position_embeddings=64, Mistral's sliding window of 32).
PARITY = {
    "llama-fp32-sharded": 64,
    "llama-bf16": 64,
    "llama-bias-linear-rope": 96,
    "llama-dynamic-rope": 300,
    "llama3-rope-bf16": 160,
    "llama-tied-fp32": 48,
    "mistral-fp32-sharded": 100,
    "mistral-bf16": 64,
    "qwen2-tied-fp32": 40,
    "qwen2-bf16-sharded": 40,
    "qwen3-fp32": 40,
    "qwen3-bf16-tied": 40,
    "gpt2-fp32": 64,
    "gpt2-bf16-sharded": 64,
    "gpt2-gelu-untied-fp32": 200,
    "gemma2-fp32": 64,
    "gemma2-bf16-sharded": 40,
    "gemma3-fp32": 64,
    "glm-fp32": 48,
    "glm4-fp32": 48,
    "glm4-bf16-sharded": 48,
    "phi3-fp32": 64,
    "phi3-partial-bf16-sharded": 48,
}


@pytest.fixture(scope="session")
def workspaces(fixture_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("rt_ws")
    cache = {}

    def get(name):
        if name not in cache:
            out = root / name
            run_kiln("convert", fixture_models / name, "-o", out)
            cache[name] = out
        return cache[name]
    return get


def hf_model(fixture_models, name):
    # Eager attention: transformers applies Gemma 2's attention soft-cap only there.
    kwargs = {"attn_implementation": "eager"} if name.startswith("gemma") else {}
    model = AutoModelForCausalLM.from_pretrained(fixture_models / name, dtype=torch.float32, **kwargs)
    return model.float().eval()


def token_ids(n, seed, vocab=31000):
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(3, vocab, size=n)]


def kiln_logits(ws, ids, tmp_path, kv="fp32", ctx=None):
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    res = run_kiln("eval", ws, "--tokens", tok, "--ctx", ctx or len(ids), "--save-logits", out, "--kv-cache", kv,
                   "--json")
    data = load_file(str(out))
    assert data["tokens"].tolist() == ids
    out.unlink()
    return data["logits"], json.loads(res.stdout)


@pytest.mark.parametrize("name", list(PARITY))
def test_logits_match_transformers(name, fixture_models, workspaces, tmp_path):
    ids = token_ids(PARITY[name], seed=len(name))
    ours, _ = kiln_logits(workspaces(name), ids, tmp_path)
    with torch.no_grad():
        ref = hf_model(fixture_models, name)(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"{name}: max |logit diff| = {diff:.3g} over {len(ids)} tokens")
    assert diff <= TOL, f"{name}: max abs diff {diff}"


def test_bf16_kv_cache_stays_close(fixture_models, workspaces, tmp_path):
    """The default KV cache of a bf16 workspace is bf16: close to fp32 in distribution, not bit-equal."""
    name = "llama-bf16"
    ids = token_ids(64, seed=3)
    ws = workspaces(name)
    fp32, _ = kiln_logits(ws, ids, tmp_path, kv="fp32")
    ref = tmp_path / "ref.safetensors"
    from safetensors.numpy import save_file
    save_file({"tokens": np.array(ids, dtype=np.int32), "logits": fp32}, str(ref))
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(ids))
    res = json.loads(run_kiln("eval", ws, "--tokens", tok, "--ctx", 64, "--ref-logits", ref, "--json").stdout)
    assert res["kv_cache"] == "bf16"
    assert res["kld_max"] < 1e-3
    assert res["top1_agreement"] >= 0.95
    assert abs(res["ppl_ratio"] - 1) < 1e-2


def test_eval_metrics_and_windows(fixture_models, workspaces, tmp_path):
    """PPL over non-overlapping windows equals the one computed from transformers' logits; self-comparison is exact."""
    name = "llama-fp32-sharded"
    ws = workspaces(name)
    ids = token_ids(90, seed=11)
    ours, res = kiln_logits(ws, ids, tmp_path, ctx=40)
    model = hf_model(fixture_models, name)
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), 40):
            w = ids[begin:begin + 40]
            logits = model(torch.tensor([w])).logits[0].double()
            assert np.abs(ours[begin:begin + len(w)] - logits.numpy()).max() <= TOL
            logp = torch.log_softmax(logits, -1)
            nll -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
            n += len(w) - 1
    assert res["n_tokens"] == n == 87
    assert res["ppl"] == pytest.approx(np.exp(nll / n), rel=1e-4)

    ref = tmp_path / "self.safetensors"
    tok = tmp_path / "t.json"
    tok.write_text(json.dumps(ids))
    run_kiln("eval", ws, "--tokens", tok, "--ctx", 40, "--save-logits", ref)
    again = json.loads(run_kiln("eval", ws, "--tokens", tok, "--ctx", 40, "--ref-logits", ref, "--json").stdout)
    for key in ("ppl", "n_tokens", "kld_mean", "kld_p99", "kld_max", "top1_agreement", "ppl_ratio"):
        assert key in again
    assert again["kld_max"] < 1e-9 and again["top1_agreement"] == 1.0 and again["ppl_ratio"] == pytest.approx(1.0)


def test_eval_text_file(workspaces, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    res = json.loads(run_kiln("eval", workspaces("qwen3-fp32"), "--text", text, "--ctx", 32, "--json").stdout)
    assert res["n_tokens"] > 0 and np.isfinite(res["ppl"])


# fixture -> prompt length; dynamic rope's prompt crosses max_position_embeddings (256) while decoding. (gemma2-fp32's
# logit soft-cap of 0.5 squeezes top-2 margins below fp32 noise; its bf16 variant has the real caps.)
GREEDY = {"llama-fp32-sharded": 12, "mistral-fp32-sharded": 20, "qwen3-bf16-tied": 10, "llama-dynamic-rope": 240,
          "llama3-rope-bf16": 50, "qwen2-tied-fp32": 8, "gpt2-fp32": 12, "gpt2-gelu-untied-fp32": 30,
          "gemma2-bf16-sharded": 12, "gemma3-fp32": 20, "glm-fp32": 10, "glm4-fp32": 10, "phi3-fp32": 16}


@pytest.mark.parametrize("name", list(GREEDY))
def test_greedy_matches_generate(name, fixture_models, workspaces, tmp_path):
    prompt = token_ids(GREEDY[name], seed=100 + len(name))
    model = hf_model(fixture_models, name)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    hf = out.sequences[0, len(prompt):].tolist()
    # Only compare up to the first step where transformers' top-2 margin is too thin for fp32 noise to be harmless.
    safe = len(hf)
    for i, s in enumerate(out.scores):
        top = torch.topk(s[0].float(), 2).values
        if float(top[0] - top[1]) < 1e-3:
            safe = i + 1
            break
    tok = tmp_path / "p.json"
    tok.write_text(json.dumps(prompt))
    res = json.loads(run_kiln("generate", workspaces(name), "--tokens", tok, "-n", 32, "--kv-cache", "fp32",
                              "--ctx", 512, "--json").stdout)
    ours = res["token_ids"]
    print(f"{name}: {len(hf)} tokens from transformers, margin-safe prefix {safe}")
    # Both stop at EOS (kiln reads it from the workspace spec, transformers from generation_config.json).
    assert ours[:safe] == hf[:safe], f"{name}: kiln {ours} vs transformers {hf}"
    if safe == len(hf):
        assert ours == hf
    assert res["prompt_tokens"] == len(prompt) and res["completion_tokens"] == len(ours)
    assert res["finish_reason"] in ("stop", "length")
    assert safe >= min(16, len(hf)), f"{name}: margins too thin to compare"


def test_generate_text_prompt_and_chat(workspaces):
    ws = workspaces("qwen3-fp32")
    res = json.loads(run_kiln("generate", ws, "--prompt", "Hello there", "-n", 5, "--json").stdout)
    assert res["completion_tokens"] <= 5 and isinstance(res["text"], str)
    chat = json.loads(run_kiln("generate", ws, "--prompt", "Hi", "--chat", "-n", 3, "--json").stdout)
    assert chat["prompt_tokens"] > res["prompt_tokens"] - 2  # the template wraps the message
    plain = run_kiln("generate", ws, "--prompt", "Hello there", "-n", 5)
    assert plain.stdout.endswith("\n")


def test_generate_non_utf8_prompt(workspaces):
    import subprocess
    from conftest import kiln_binary
    proc = subprocess.run([str(kiln_binary()), "generate", str(workspaces("llama-fp32-sharded")), "--prompt",
                           b"caf\xe9 \xff\xfe ok", "-n", "3", "--json"], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] > 0


def test_prompt_longer_than_context(workspaces, tmp_path):
    tok = tmp_path / "p.json"
    tok.write_text(json.dumps(token_ids(40, 1)))
    proc = run_kiln("generate", workspaces("llama-fp32-sharded"), "--tokens", tok, "--ctx", 16, check=False)
    assert proc.returncode != 0
    assert "more than the context of 16 tokens" in proc.stderr and proc.stderr.count("\n") == 1


def test_missing_and_corrupt_workspace(workspaces, tmp_path):
    proc = run_kiln("generate", tmp_path / "nope", "--prompt", "x", check=False)
    assert proc.returncode != 0 and "no such file or directory" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_kiln("eval", tmp_path, "--tokens", tmp_path / "x.json", check=False)
    assert proc.returncode != 0 and "neither a kiln workspace" in proc.stderr
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(workspaces("llama-tied-fp32"), bad)
    shard = sorted(bad.glob("weights-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    proc = run_kiln("generate", bad, "--prompt", "x", check=False)
    assert proc.returncode != 0 and shard.name in proc.stderr and proc.stderr.count("\n") == 1
