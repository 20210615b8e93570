"""kiln quantize --head int8 (docs/int4_layout.md, "The int8 LM head") against independent oracles:
- the stored lm_head.qweight / lm_head.scales are byte-equal to a numpy Q8_0-style quantization of the original head
  (d = fp16(max|block| / 127), q = clip(round(w / d), -127, 127), blocks of 32 inputs), and a tied model's embedding
  table is left byte for byte as it was;
- kiln's logits equal a torch emulation of the documented math on transformers' final hidden states (the head's input
  rounded to int8 per block of 32, exact int products, float scales): max |diff| <= 1e-5 (measured ~7e-7: fp32
  summation order and ~1e-6 upstream noise; a position whose activation sits on a rounding boundary may round the other way, which
  int8_logits_close tolerates up to 5e-3);
- and they stay close to transformers' fp32 logits (mean KL divergence < 1e-4 on these random-init models).
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import copy_tokenizer, REPO, run_kiln
from hf_oracle import int8_logits_close

EVAL_TEXT = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
EMU_TOL, FAR_TOL, KLD_MAX = 1e-5, 5e-3, 1e-4


def numpy_q8_0(w):
    """Q8_0-style blocks written from the spec: returns (int8 codes [rows, cols], fp16 scales [rows, cols / 32])."""
    w = w.astype(np.float32)
    rows, cols = w.shape
    b = w.reshape(rows, cols // 32, 32)
    scales = (np.abs(b).max(-1) / np.float32(127)).astype(np.float16)
    d = scales.astype(np.float32)
    nz = d != 0
    q = np.where(nz[..., None], np.clip(np.round(b / np.where(nz, d, 1)[..., None]), -127, 127), 0)
    return q.astype(np.int8).reshape(rows, cols), scales


def tensors(ws):
    out = {}
    for f in sorted(ws.glob("weights-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def workspaces(fixture_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8head")
    out = {}
    for name in ("llama-tied-fp32", "llama-fp32-sharded"):
        run_kiln("convert", fixture_models / name, "-o", root / name)
        run_kiln("quantize", root / name, "-o", root / (name + "-h8"), "--method", "none", "--head", "int8")
        out[name] = (root / name, root / (name + "-h8"))
    return out


@pytest.mark.parametrize("name", ["llama-tied-fp32", "llama-fp32-sharded"])
def test_stored_head_equals_numpy_q8_0(name, workspaces):
    src, ws = workspaces[name]
    before, after = tensors(src), tensors(ws)
    head = before["tok_embeddings.weight" if "tied" in name else "lm_head.weight"]
    q, s = numpy_q8_0(head)
    assert after["lm_head.qweight"].dtype == np.int8 and after["lm_head.scales"].dtype == np.float16
    assert after["lm_head.qweight"].tobytes() == q.tobytes()
    assert after["lm_head.scales"].tobytes() == s.tobytes()
    assert "lm_head.weight" not in after
    # Everything else is copied bit for bit; a tied model's embedding gather keeps its table.
    for k, v in before.items():
        if k != "lm_head.weight":
            assert after[k].tobytes() == v.tobytes(), k
    doc = json.loads((ws / "kiln.json").read_text())
    assert doc["quantization"]["head"] == {"dtype": "int8", "group_size": 32}
    assert doc["quantization"]["weights"] == {"method": "none"}
    run_kiln("verify", ws)
    assert json.loads(run_kiln("inspect", ws, "--json").stdout)["quantization"]["head"]["dtype"] == "int8"


def emulated_head(hidden, q, s):
    """The documented int8 head on final hidden states [n, H]: x8 = round(x * (1 / d)) per 32-block, d = max|x| / 127
    (fp32), y = sum_b s[o, b] * d[b] * sum(q * x8) (exact integer dots, float64 sums)."""
    n, H = hidden.shape
    x = hidden.reshape(n, H // 32, 32).float()
    d = x.abs().amax(-1) / 127.0
    x8 = torch.where(d[..., None] > 0, torch.round(x * (1.0 / torch.where(d > 0, d, 1.0))[..., None]), 0.0)
    dots = torch.einsum("nbk,vbk->nvb", x8.double(), torch.from_numpy(q).double().reshape(q.shape[0], H // 32, 32))
    return (dots * d.double()[:, None, :] * torch.from_numpy(s.astype(np.float32)).double()[None]).sum(-1).numpy()


def kld_mean(ours, ref):
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(np.asarray(ours)).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("name", ["llama-tied-fp32", "llama-fp32-sharded"])
def test_logits_match_emulation_and_transformers(name, workspaces, fixture_models, tmp_path):
    _, ws = workspaces[name]
    after = tensors(ws)
    model = AutoModelForCausalLM.from_pretrained(fixture_models / name, dtype=torch.float32).eval()
    ids = [int(x) for x in np.random.default_rng(7).integers(3, 31000, size=40)]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    ref = out.logits[0].numpy()
    emu = emulated_head(out.hidden_states[-1][0], after["lm_head.qweight"], after["lm_head.scales"])
    tok = tmp_path / "t.json"
    tok.write_text(json.dumps(ids))
    saved = tmp_path / "l.safetensors"
    for isa in (None, "scalar"):  # the VNNI kernel where the CPU has it, and the portable one
        env = {"KILN_CPU_ISA": isa} if isa else {}
        run_kiln("eval", ws, "--tokens", tok, "--ctx", 40, "--kv-cache", "fp32", "--save-logits", saved,
                 env=dict(os.environ, **env))
        ours = load_file(str(saved))["logits"]
        diff, kld = float(np.abs(ours - emu).max()), kld_mean(ours, ref)
        print(f"{name} isa={isa}: max |diff| vs emulation {diff:.3g}, vs fp32 {float(np.abs(ours - ref).max()):.3g}, "
              f"KLD vs fp32 {kld:.3g}")
        assert int8_logits_close(ours, emu, EMU_TOL, FAR_TOL)
        assert kld < KLD_MAX


def test_quantized_linears_with_int8_head_and_quality_report(workspaces, tmp_path):
    src, h8 = workspaces["llama-tied-fp32"]
    r = run_kiln("quantize", src, "-o", tmp_path / "q", "--method", "rtn", "--group-size", 32, "--head", "int8",
                 "--eval-text", EVAL_TEXT, "--eval-tokens", 128, "--eval-ctx", 64, "--json")
    rep = json.loads(r.stdout)
    assert rep["head"] == {"dtype": "int8", "group_size": 32} and rep["quality"]["kld_mean"] > 0
    a, b = tensors(tmp_path / "q"), tensors(h8)
    assert a["lm_head.qweight"].tobytes() == b["lm_head.qweight"].tobytes()
    assert "layers.0.attn.qkv.qweight" in a
    run_kiln("verify", tmp_path / "q")
    # The head-only workspace's report: the head is the only change, so the report measures exactly its cost.
    r = run_kiln("quantize", src, "-o", tmp_path / "h", "--method", "none", "--head", "int8", "--eval-text",
                 EVAL_TEXT, "--eval-tokens", 128, "--eval-ctx", 64, "--json")
    q = json.loads(r.stdout)["quality"]
    assert 0 < q["kld_mean"] < KLD_MAX


def test_awq_with_int8_head_quantizes_the_untouched_head(workspaces, tmp_path):
    """AWQ changes layer tensors only: an untied model's int8 head is the same as with --method none."""
    src, h8 = workspaces["llama-fp32-sharded"]
    run_kiln("quantize", src, "-o", tmp_path / "awq", "--method", "awq", "--group-size", 32, "--head", "int8",
             "--data", EVAL_TEXT, "--samples", 4, "--seqlen", 32, "--awq-no-clip")
    a, b = tensors(tmp_path / "awq"), tensors(h8)
    for k in ("lm_head.qweight", "lm_head.scales"):
        assert a[k].tobytes() == b[k].tobytes(), k
    run_kiln("verify", tmp_path / "awq")


def one_line_error(r):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_refusals(workspaces, fixture_models, tmp_path):
    src, h8 = workspaces["llama-fp32-sharded"]
    assert "--head int8" in one_line_error(run_kiln("quantize", src, "-o", tmp_path / "a", "--method", "none",
                                                    check=False))
    assert "int8 head" in one_line_error(run_kiln("quantize", h8, "-o", tmp_path / "b", "--method", "rtn",
                                                  "--group-size", 32, "--head", "int8", check=False))
    assert "int8" in one_line_error(run_kiln("export", h8, "--format", "autoawq", "-o", tmp_path / "c", check=False))
    # hidden_size 48 is not a whole number of 32-input blocks.
    cfg = LlamaConfig(vocab_size=32000, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "h48")
    copy_tokenizer(fixture_models / "llama-tied-fp32", tmp_path / "h48")
    run_kiln("convert", tmp_path / "h48", "-o", tmp_path / "h48-ws")
    err = one_line_error(run_kiln("quantize", tmp_path / "h48-ws", "-o", tmp_path / "d", "--method", "none", "--head",
                                  "int8", check=False))
    assert "not a multiple of 32" in err and "tok_embeddings.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h48", "h48-ws"]  # nothing half written


@pytest.mark.parametrize("tensor,dtype,shape", [("lm_head.qweight", np.uint8, None),
                                                ("lm_head.scales", np.float16, (32000, 4)),
                                                ("lm_head.scales", np.float32, None)])
def test_hostile_head_tensors_are_one_line_errors(workspaces, tmp_path, tensor, dtype, shape):
    _, h8 = workspaces["llama-tied-fp32"]
    ws = tmp_path / "ws"
    shutil.copytree(h8, ws)
    for f in ws.glob("weights-*.safetensors"):
        t = load_file(str(f))
        if tensor in t:
            v = t[tensor]
            t[tensor] = np.zeros(shape, dtype) if shape else v.view(dtype) if v.itemsize == np.dtype(dtype).itemsize \
                else v.astype(dtype)
            save_file(t, str(f))
            # A workspace edited by hand and re-hashed: its manifest and kiln.json hash match the hostile shard.
            doc = json.loads((ws / "kiln.json").read_text())
            doc["manifest"][f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
            body = {k: v for k, v in doc.items() if k != "kiln_json_sha256"}
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            doc["kiln_json_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
            (ws / "kiln.json").write_text(json.dumps(doc, indent=2) + "\n")
    err = one_line_error(run_kiln("generate", ws, "--prompt", "Hello", "-n", 2, check=False))
    assert tensor in err, err
    r = run_kiln("verify", ws, check=False)
    assert r.returncode != 0 and tensor in r.stdout + r.stderr, (r.stdout, r.stderr)
