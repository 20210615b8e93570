"""kiln calibrate against transformers: the drawn token blocks against a Python re-implementation of the documented
sampling (docs/calibration.md), and every statistic against forward hooks on the HF model run on those blocks.

Tolerance: both sides compute fp32 activations with fp32 accumulation and differ only in summation order (~1e-6
relative on these 2-layer fixtures); kiln averages in double. We assert rtol 1e-4 (atol 1e-6 for values near zero):
a wrong tap point (before/after a norm, before RoPE, missing bias) moves stats by far more than that.
"""
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_kiln

RTOL, ATOL = 1e-4, 1e-6
SAMPLES, SEQLEN, SEED = 4, 32, 7

WORDS = ("the a of cat river quantize model token seven 42 über naïve 東京 café running jumped quietly "
         "whose light falls on the hills and, yes, it's 3.14 percent!").split()


def make_docs(n=12, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


# ---- the documented sampling, re-implemented
M64 = (1 << 64) - 1


def _mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def draw_starts(total, samples, seqlen, seed):
    k = min(samples, total // seqlen)
    slack = total - k * seqlen
    key = _mix(seed ^ 0x6A09E667F3BCC909)
    u = sorted(_mix((key + (i + 1) * 0x9E3779B97F4A7C15) & M64) % (slack + 1) for i in range(k))
    return [u[i] + i * seqlen for i in range(k)]


def token_stream(fixture_dir, docs):
    tok = AutoTokenizer.from_pretrained(fixture_dir)
    cfg = json.loads((fixture_dir / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        eos = tok.eos_token_id
    stream = []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False)
        if ids and stream and eos is not None:
            stream.append(eos)
        stream += ids
    return stream


# ---- the oracle: transformers with hooks
def hf_stats(fixture_dir, blocks):
    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).float().eval()
    inputs, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("attn.qkv", layer.self_attn.q_proj), ("attn.o", layer.self_attn.o_proj),
                          ("ffn.gate_up", layer.mlp.gate_proj), ("ffn.down", layer.mlp.down_proj)):
            def hook(_m, args, key=f"layers.{i}.{name}.input"):
                inputs[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        out = model(torch.tensor(blocks), use_cache=True)
    for h in hooks:
        h.remove()
    ref = {}
    for key, x in inputs.items():
        ref[key + ".abs_mean"] = np.abs(x).mean(0)
        ref[key + ".abs_max"] = np.abs(x).max(0)
        ref[key + ".sq_mean"] = (x * x).mean(0)
    # The cache holds K after RoPE (and the Qwen3 k-norm) and V: [batch, kv_heads, tokens, head_dim].
    for i, layer in enumerate(out.past_key_values.layers):
        for which, t in (("k", layer.keys), ("v", layer.values)):
            t = t.double().numpy()
            ref[f"layers.{i}.kv.{which}_min"] = t.min(axis=(0, 2, 3))
            ref[f"layers.{i}.kv.{which}_max"] = t.max(axis=(0, 2, 3))
            ref[f"layers.{i}.kv.{which}_abs_max"] = np.abs(t).max(axis=(0, 2, 3))
    return ref


@pytest.fixture(scope="module")
def workspaces(fixture_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("cal_ws")
    cache = {}

    def get(name):
        if name not in cache:
            run_kiln("convert", fixture_models / name, "-o", root / name)
            cache[name] = root / name
        return cache[name]
    return get


def calibrate(ws, data, out, *extra, check=True):
    return run_kiln("calibrate", ws, "--data", data, "-o", out, "--json", *map(str, extra), check=check)


# llama: plain; qwen2: qkv bias and tied embeddings; qwen3: q/k norm before RoPE.
@pytest.mark.parametrize("name", ["llama-fp32-sharded", "qwen2-tied-fp32", "qwen3-fp32"])
def test_stats_match_transformers(name, fixture_models, workspaces, tmp_path):
    docs = make_docs()
    data = write_jsonl(tmp_path / "data.jsonl", docs)
    out = tmp_path / "stats.safetensors"
    # --batch-tokens 64: two ragged batches of two blocks, so accumulation across forwards is exercised too.
    res = json.loads(calibrate(workspaces(name), data, out, "--samples", SAMPLES, "--seqlen", SEQLEN, "--seed", SEED,
                               "--batch-tokens", 64).stdout)
    stats = load_file(str(out))

    stream = token_stream(fixture_models / name, docs)
    starts = draw_starts(len(stream), SAMPLES, SEQLEN, SEED)
    blocks = [stream[s:s + SEQLEN] for s in starts]
    assert res["block_starts"] == starts and res["dataset_tokens"] == len(stream)
    assert stats["calib.starts"].tolist() == starts
    assert stats["calib.tokens"].tolist() == blocks
    assert res["samples"] == SAMPLES and res["tokens"] == SAMPLES * SEQLEN and res["peak_rss_bytes"] > 0

    ref = hf_stats(fixture_models / name, blocks)
    expected = set(ref) | {"calib.starts", "calib.tokens"}
    assert set(stats) == expected
    worst = 0.0
    for key, want in ref.items():
        got = stats[key]
        assert got.dtype == np.float32 and got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=key)
        worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-6))))
    print(f"{name}: {len(ref)} stats tensors, worst relative diff {worst:.2g}")


def test_deterministic_and_seeded(workspaces, tmp_path):
    ws = workspaces("llama-fp32-sharded")
    data = write_jsonl(tmp_path / "data.jsonl", make_docs(30, seed=1))
    args = ("--samples", 3, "--seqlen", 16)
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    calibrate(ws, data, a, *args, "--seed", 1)
    calibrate(ws, data, b, *args, "--seed", 1, "--batch-tokens", 16)  # a different batch split, same bytes
    calibrate(ws, data, c, *args, "--seed", 2)
    assert a.read_bytes() == b.read_bytes()
    assert load_file(str(a))["calib.starts"].tolist() != load_file(str(c))["calib.starts"].tolist()
    with safe_open(str(a), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "kiln-calib" and meta["seed"] == "1" and meta["seqlen"] == "16"
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["stats_sha256"] and report["seed"] == 1 and report["samples_requested"] == 3


def test_txt_default_output_and_force(workspaces, tmp_path):
    ws = workspaces("llama-fp32-sharded")
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(make_docs(6, seed=2)))
    res = json.loads(run_kiln("calibrate", ws, "--data", data, "--samples", 2, "--seqlen", 16, "--json").stdout)
    stats = ws.parent / (ws.name + ".calib.safetensors")
    assert res["stats"] == str(stats) and stats.exists() and (ws.parent / (ws.name + ".calib.json")).exists()
    again = run_kiln("calibrate", ws, "--data", data, "--samples", 2, "--seqlen", 16, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    run_kiln("calibrate", ws, "--data", data, "--samples", 2, "--seqlen", 16, "--force")
    run_kiln("verify", ws)  # nothing was written into the workspace
    # More samples than fit: a warning, and as many blocks as the data holds.
    many = json.loads(run_kiln("calibrate", ws, "--data", data, "--samples", 1000, "--seqlen", 16, "--json",
                               "--force").stdout)
    assert many["samples"] == many["dataset_tokens"] // 16 < 1000


@pytest.mark.parametrize("case,content,message", [
    ("empty.txt", "", "the dataset is empty"),
    ("blank.jsonl", "\n\n", "the dataset is empty"),
    ("short.txt", "only a few words", "fewer than one block of 32"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
    ("nofield.jsonl", '{"text": "fine"}\n{"body": "x"}\n', "nofield.jsonl:2: no field 'text'"),
    ("notstr.jsonl", '{"text": 5}\n', "notstr.jsonl:1: field 'text' is number, not a string"),
    ("array.jsonl", '["text"]\n', "array.jsonl:1: expected a JSON object"),
    ("data.csv", "text\n", "unsupported dataset format '.csv'"),
])
def test_bad_input(case, content, message, workspaces, tmp_path):
    ws = workspaces("llama-fp32-sharded")
    data = tmp_path / case
    data.write_text(content)
    out = tmp_path / "stats.safetensors"
    proc = calibrate(ws, data, out, "--seqlen", 32, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [case]  # no output, no temporary left behind


def test_missing_data_file(workspaces, tmp_path):
    proc = calibrate(workspaces("llama-fp32-sharded"), tmp_path / "nope.jsonl", tmp_path / "s.safetensors",
                     check=False)
    assert proc.returncode == 1 and "nope.jsonl: no such file" in proc.stderr
