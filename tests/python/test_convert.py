"""kiln convert / inspect / verify against transformers' own reading of the fixture checkpoints.

The oracle for every tensor is the state dict that transformers loads from the same directory; dtype changes are
checked against torch's `.to()`, which rounds to nearest even like kiln."""
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from arch_oracle import canonical_from_state_dict
from conftest import kiln_binary, run_kiln

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fixture_names(fixture_models):
    return [v["name"] for v in json.loads((fixture_models / "index.json").read_text())]


def load_workspace(ws: Path):
    meta = json.loads((ws / "kiln.json").read_text())
    tensors = {}
    for f in meta["weights"]["files"]:
        tensors.update(load_file(ws / f))  # the reference safetensors reader must accept kiln's files
    return meta, tensors


def expected_canonical(hf_dir: Path, dtype):
    """Canonical tensors built from transformers' state dict: fused q/k/v and gate/up, renamed."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config
    other = canonical_from_state_dict(cfg.architectures[0], sd, cfg)  # GPT-2, Gemma, GLM, Phi-3
    if other is not None:
        return cfg, {k: v.to(dtype) for k, v in other.items()} if dtype is not None else other
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        L = f"layers.{i}."
        a = p + "self_attn."
        out[L + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[L + "attn.qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
        if a + "q_proj.bias" in sd:
            out[L + "attn.qkv.bias"] = torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]])
        if a + "q_norm.weight" in sd:
            out[L + "attn.q_norm.weight"] = sd[a + "q_norm.weight"]
            out[L + "attn.k_norm.weight"] = sd[a + "k_norm.weight"]
        out[L + "attn.o.weight"] = sd[a + "o_proj.weight"]
        if a + "o_proj.bias" in sd:
            out[L + "attn.o.bias"] = sd[a + "o_proj.bias"]
        out[L + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        m = p + "mlp."
        out[L + "ffn.gate_up.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]])
        if m + "gate_proj.bias" in sd:
            out[L + "ffn.gate_up.bias"] = torch.cat([sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]])
        out[L + "ffn.down.weight"] = sd[m + "down_proj.weight"]
        if m + "down_proj.bias" in sd:
            out[L + "ffn.down.bias"] = sd[m + "down_proj.bias"]
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return model.config, out


def assert_bit_equal(name, got, want):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]
    assert torch.equal(got.view(view), want.view(view)), f"{name}: bytes differ"


@pytest.fixture(scope="module")
def fixtures(fixture_models):
    return fixture_models


@pytest.mark.parametrize("dtype", ["auto", "fp32", "bf16", "fp16"])
def test_every_tensor_arrives_exactly(fixtures, tmp_path, dtype):
    for name in fixture_names(fixtures):
        src = fixtures / name
        ws = tmp_path / f"{name}-{dtype}"
        run_kiln("convert", src, "-o", ws, "--dtype", dtype)
        meta, got = load_workspace(ws)
        config, want = expected_canonical(src, None if dtype == "auto" else TORCH_DTYPES[dtype])
        assert set(got) == set(want), f"{name}: tensor names differ: {set(got) ^ set(want)}"
        for k in want:
            assert_bit_equal(f"{name}:{k}", got[k], want[k])
        m = meta["model"]
        assert m["architecture"] == config.architectures[0]
        assert m["num_layers"] == config.num_hidden_layers
        # Qwen3 fixtures set head_dim (32) unlike hidden / heads (16): the explicit value must win.
        want_head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        assert m["head_dim"] == want_head_dim, (name, m["head_dim"], want_head_dim)
        assert m["tie_word_embeddings"] == config.tie_word_embeddings
        rp = getattr(config, "rope_parameters", None) or {}
        rp = rp.get("full_attention", rp)  # Gemma 3: the global layers' parameters
        if "rope_theta" in rp:  # GPT-2 has learned positions instead
            assert m["rope"]["theta"] == rp["rope_theta"]
            assert m["rope"]["scaling"] == (rp["rope_type"] if rp["rope_type"] != "default" else "none")
        if dtype == "auto":
            names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # llama-fp16 is an fp16 source
            assert meta["dtype"] == names[str(config.dtype).replace("torch.", "")]
        assert run_kiln("verify", ws).returncode == 0


def test_sharded_output_and_tokenizer_files(fixtures, tmp_path):
    src = fixtures / "qwen3-fp32"
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws, "--shard-size-mb", "1")
    meta, tensors = load_workspace(ws)
    files = meta["weights"]["files"]
    assert len(files) >= 3
    for f in files:  # each shard is within the limit unless it holds one tensor bigger than the limit
        header, _ = read_st(ws / f)
        assert (ws / f).stat().st_size <= (1 << 20) + 65536 or len(header) == 1
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (ws / f).read_bytes() == (src / f).read_bytes()
    # The chat template is resolved from tokenizer_config.json the way transformers does.
    tmpl = json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    assert (ws / "chat_template.jinja").read_text() == tmpl
    assert meta["model"]["qk_norm"] is True and meta["model"]["head_dim"] == 32
    assert run_kiln("verify", ws).returncode == 0


def test_conversion_is_deterministic(fixtures, tmp_path):
    for name in ("llama-fp32-sharded", "qwen2-bf16-sharded"):
        a, b = tmp_path / f"{name}-a", tmp_path / f"{name}-b"
        run_kiln("convert", fixtures / name, "-o", a, "--dtype", "bf16", "--shard-size-mb", "1")
        run_kiln("convert", fixtures / name, "-o", b, "--dtype", "bf16", "--shard-size-mb", "1")
        files_a = sorted(p.name for p in a.iterdir())
        assert files_a == sorted(p.name for p in b.iterdir())
        for f in files_a:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{name}: {f} differs between two converts"


def test_verify_catches_a_flipped_byte(fixtures, tmp_path):
    ws = tmp_path / "ws"
    run_kiln("convert", fixtures / "llama-bf16", "-o", ws)
    weights = ws / json.loads((ws / "kiln.json").read_text())["weights"]["files"][0]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(data)
    r = run_kiln("verify", ws, "--json", check=False)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert not report["ok"] and any(weights.name in p and "sha256" in p for p in report["problems"])
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(data)
    assert run_kiln("verify", ws).returncode == 0
    (ws / "tokenizer.json").write_text("{}")
    r = run_kiln("verify", ws, check=False)
    assert r.returncode == 1 and "tokenizer.json" in r.stderr
    (ws / "stray.bin").write_bytes(b"x")
    assert "stray.bin" in run_kiln("verify", ws, check=False).stderr


def test_inspect_hf_dir_and_workspace(fixtures, tmp_path):
    src = fixtures / "mistral-fp32-sharded"
    hf = json.loads(run_kiln("inspect", src, "--json").stdout)
    assert hf["kind"] == "hf_checkpoint" and hf["model"]["sliding_window"] == 32 and hf["shards"] == 4
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws)
    info = json.loads(run_kiln("inspect", ws, "--json").stdout)
    assert info["kind"] == "workspace" and info["parameters"] == hf["parameters"]
    assert info["quantization"]["weights"]["method"] == "none"
    text = run_kiln("inspect", ws).stdout
    assert "MistralForCausalLM" in text and "parameters" in text


def test_fp16_overflow_names_the_tensor(fixtures, tmp_path):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(fixtures / "llama-tied-fp32"), str(src)], check=True)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = 1.0e5
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "ws"
    r = run_kiln("convert", src, "-o", out, "--dtype", "fp16", check=False)
    assert r.returncode != 0
    assert "model.layers.1.mlp.down_proj.weight" in r.stderr and "fp16" in r.stderr
    assert not out.exists()
    assert run_kiln("convert", src, "-o", out, "--dtype", "bf16").returncode == 0


# ---- bad input: one clear line, exit != 0, and nothing left behind ----

def read_st(path: Path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header, data: bytes, lie_len=None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", lie_len if lie_len is not None else len(h)) + h + data)


def break_truncated(d):
    p = d / "model-00002-of-00006.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return "model-00002-of-00006.safetensors"


def break_header_length(d):
    p = d / "model-00003-of-00006.safetensors"
    h, data = read_st(p)
    write_st(p, h, data, lie_len=10 ** 9)
    return "model-00003-of-00006.safetensors"


def break_overlap(d):
    p = max(d.glob("model-*.safetensors"), key=lambda f: len(read_st(f)[0]))
    h, data = read_st(p)
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size_b]  # b now lies on a's bytes
    write_st(p, h, data)
    return "overlaps"


def break_dtype(d):
    p = d / "model-00004-of-00006.safetensors"
    h, data = read_st(p)
    name = next(k for k in h if k != "__metadata__")
    h[name]["dtype"] = "F12"
    write_st(p, h, data)
    return "F12"


def break_missing_shard(d):
    (d / "model-00005-of-00006.safetensors").unlink()
    return "model-00005-of-00006.safetensors"


def break_index_names_absent_tensor(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00006.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "model.layers.9.mlp.up_proj.weight"


def break_config_key(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    return "num_hidden_layers"


def break_architecture(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return "LlamaForCausalLM"  # the message lists what is supported


def break_bad_json(d):
    (d / "config.json").write_text("{ not json")
    return "config.json"


def break_shape(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    return "mlp"


BREAKERS = [break_truncated, break_header_length, break_overlap, break_dtype, break_missing_shard,
            break_index_names_absent_tensor, break_config_key, break_architecture, break_bad_json, break_shape]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__)
def test_bad_input_is_refused_cleanly(fixtures, tmp_path, breaker):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(fixtures / "llama-fp32-sharded"), str(src)], check=True)
    needle = breaker(src)
    out = tmp_path / "ws"
    r = run_kiln("convert", src, "-o", out, check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("kiln convert: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "output or staging directory left behind"


def test_existing_output_is_refused_without_force(fixtures, tmp_path):
    out = tmp_path / "ws"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run_kiln("convert", fixtures / "llama-bf16", "-o", out, check=False)
    assert r.returncode != 0 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    run_kiln("convert", fixtures / "llama-bf16", "-o", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "kiln.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_json_output_and_no_progress_in_logs(fixtures, tmp_path):
    r = run_kiln("convert", fixtures / "qwen2-tied-fp32", "-o", tmp_path / "ws", "--json")
    summary = json.loads(r.stdout)
    assert summary["architecture"] == "Qwen2ForCausalLM"
    assert summary["tensors"] == len(load_workspace(tmp_path / "ws")[1])
    assert "\r" not in r.stderr and r.stderr == ""


def test_interrupt_leaves_nothing_behind(tmp_path):
    # A checkpoint big enough that conversion takes a while: one 48M-element tensor, converted to bf16.
    src = tmp_path / "src"
    src.mkdir()
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=750000, torch_dtype="float32")
    (src / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    H, I, V = 64, 128, 750000
    sd = {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "lm_head.weight": torch.randn(V, H, generator=g),
          "model.norm.weight": torch.ones(H), "model.layers.0.input_layernorm.weight": torch.ones(H),
          "model.layers.0.post_attention_layernorm.weight": torch.ones(H)}
    for n, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (32, H)), ("self_attn.v_proj", (32, H)),
                     ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                     ("mlp.down_proj", (H, I))]:
        sd[f"model.layers.0.{n}.weight"] = torch.randn(*shape, generator=g)
    save_file(sd, src / "model.safetensors")
    out = tmp_path / "ws"
    proc = subprocess.Popen([str(kiln_binary()), "convert", str(src), "-o", str(out), "--dtype", "fp16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.startswith(".ws.kiln-tmp") for p in tmp_path.iterdir()):
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert proc.returncode == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
