"""kiln export --format autoawq and kiln convert of AutoAWQ checkpoints (docs/int4_layout.md, "AutoAWQ GEMM layout").

Oracles, none of them kiln reading its own output:
- a numpy model of the AutoAWQ GEMM layout written here from the format description (qweight int32 [in, out/8],
  qzeros int32 [in/G, out/8], scales fp16 [in/G, out], nibble i of an int32 = output 8c + ORDER[i],
  w = (q - z) * s), checked against kiln's canonical int4 tensors dequantized in numpy;
- an AutoAWQ checkpoint built here in numpy from a transformers fixture, imported by kiln convert and run by kiln eval,
  against transformers running the same fixture with the numpy-dequantized weights;
- transformers loading the exported config.json;
- AutoAWQ's own code (its unpack/dequantize and its WQLinear_GEMM.from_linear packer, pure torch, installed by
  scripts/setup.sh without dependencies).

Tolerance of the transformers comparisons: 1e-3 max |logit diff|, as test_runtime.py / test_quantize.py. Both sides
use the same fp32 weights (dequantized codes, fp16 tensors widened); what remains is fp32 summation order and kiln's
fused int4 kernel (s * sum(x*q) - z*s * sum(x)), which moves these 2-layer models' logits by ~1e-6.
"""
import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, copy_tokenizer, run_kiln
from hf_oracle import greedy, int8_logits_close, kiln_int8_activations, round_linear_inputs_int8

TOL = 1e-3
GS = 32
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
ARCHS = ["llama-fp32-sharded", "llama-bias-linear-rope", "llama-tied-fp32", "llama3-rope-bf16", "mistral-fp32-sharded",
         "qwen2-bf16-sharded", "qwen3-bf16-tied"]
PROJ = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attn.o": ["self_attn.o_proj"],
        "ffn.gate_up": ["mlp.gate_proj", "mlp.up_proj"], "ffn.down": ["mlp.down_proj"]}


# --- the AutoAWQ GEMM layout in numpy ------------------------------------------------------------------------------
def awq_unpack(packed):
    """int32 [R, C] -> codes uint8 [R, 8C]: nibble i of column c is column 8c + ORDER[i]."""
    p = packed.view(np.uint32)
    out = np.zeros((p.shape[0], p.shape[1] * 8), np.uint8)
    for i, j in enumerate(ORDER):
        out[:, j::8] = (p >> np.uint32(4 * i)) & np.uint32(15)
    return out


def awq_pack(codes):
    """codes [R, N] (values 0..15) -> int32 [R, N/8]."""
    c = codes.astype(np.uint32)
    out = np.zeros((c.shape[0], c.shape[1] // 8), np.uint32)
    for i, j in enumerate(ORDER):
        out |= c[:, j::8] << np.uint32(4 * i)
    return out.view(np.int32)


def awq_dequantize(qweight, qzeros, scales, gs):
    """-> fp32 [out, in] (HF layout)."""
    q = awq_unpack(qweight).astype(np.float32)                     # [in, out]
    z = np.repeat(awq_unpack(qzeros).astype(np.float32), gs, 0)   # [in, out]
    s = np.repeat(scales.astype(np.float32), gs, 0)
    return ((q - z) * s).T


def kiln_dequantize(qweight, scales, zeros, gs):
    """The canonical int4 layout (docs/int4_layout.md): even input in the low nibble."""
    q = np.stack([qweight & 0xF, qweight >> 4], axis=-1).reshape(qweight.shape[0], -1).astype(np.float32)
    return (q - np.repeat(zeros.astype(np.float32), gs, 1)) * np.repeat(scales.astype(np.float32), gs, 1)


def load_dir(d, pattern):
    out = {}
    for f in sorted(Path(d).glob(pattern)):
        t = load_torch_any(f)
        out.update(t)
    return out


def load_torch_any(f):
    from safetensors.torch import load_file as lt
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in lt(str(f)).items()}


def spec(ws):
    return json.loads((Path(ws) / "kiln.json").read_text())["model"]


def part_rows(sp):
    q, kv, inter = sp["num_heads"] * sp["head_dim"], sp["num_kv_heads"] * sp["head_dim"], sp["intermediate_size"]
    return {"attn.qkv": [q, kv, kv], "attn.o": [sp["hidden_size"]], "ffn.gate_up": [inter, inter],
            "ffn.down": [sp["hidden_size"]]}


# --- pipelines -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(fixture_models, tmp_path_factory):
    """name, dtype, method -> (converted, quantized, exported) directories, made once."""
    root = tmp_path_factory.mktemp("autoawq")
    cache = {}

    def get(name, dtype="auto", method="rtn"):
        key = (name, dtype, method)
        if key not in cache:
            base = root / f"{name}-{dtype}-{method}"
            ws, q, ex = Path(f"{base}.ws"), Path(f"{base}.q"), Path(f"{base}.awq")
            run_kiln("convert", fixture_models / name, "-o", ws, "--dtype", dtype)
            extra = ["--data", CALIB, "--samples", 4, "--seqlen", 64] if method == "awq" else []
            run_kiln("quantize", ws, "-o", q, "--method", method, "--group-size", GS, *extra)
            run_kiln("export", q, "--format", "autoawq", "-o", ex, "--shard-size-mb", 1 if "sharded" in name else 4096)
            cache[key] = (ws, q, ex)
        return cache[key]
    return get


def eval_logits(ws, tmp_path, ids):
    tok = tmp_path / "ids.json"
    tok.write_text(json.dumps(ids))
    saved = tmp_path / f"{Path(ws).name}.logits.safetensors"
    run_kiln("eval", ws, "--tokens", tok, "--ctx", len(ids), "--kv-cache", "fp32", "--save-logits", saved)
    return load_file(str(saved))["logits"]


IDS = [int(x) for x in np.random.default_rng(11).integers(3, 31000, size=40)]


# --- 1. export against the numpy model of the layout ------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_export_matches_numpy_layout(name, pipeline):
    _, q, ex = pipeline(name)
    kiln = load_dir(q, "weights-*.safetensors")
    hf = load_dir(ex, "model*.safetensors")
    sp = spec(q)
    if "sharded" in name:
        index = json.loads((ex / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(hf)
        assert len(set(index["weight_map"].values())) > 1
    cfg = json.loads((ex / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": GS, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    assert cfg["torch_dtype"] == "float16"
    src_cfg = json.loads((Path(json.loads((q / "kiln.json").read_text())["provenance"]["source_provenance"]["source"])
                          / "config.json").read_text())
    for k in ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        if k in src_cfg:
            assert cfg[k] == src_cfg[k], k

    expected = set()
    for i in range(sp["num_layers"]):
        for mod, projs in PROJ.items():
            w = kiln_dequantize(kiln[f"layers.{i}.{mod}.qweight"], kiln[f"layers.{i}.{mod}.scales"],
                                kiln[f"layers.{i}.{mod}.zeros"], GS)
            row = 0
            for proj, rows in zip(projs, part_rows(sp)[mod]):
                b = f"model.layers.{i}.{proj}"
                expected |= {b + ".qweight", b + ".qzeros", b + ".scales"}
                assert hf[b + ".qweight"].dtype == np.int32 and hf[b + ".qweight"].shape == (w.shape[1], rows // 8)
                assert hf[b + ".scales"].dtype == np.float16 and hf[b + ".scales"].shape == (w.shape[1] // GS, rows)
                ours = awq_dequantize(hf[b + ".qweight"], hf[b + ".qzeros"], hf[b + ".scales"], GS)
                assert np.array_equal(ours, w[row:row + rows]), b
                row += rows
    # Every other tensor: the workspace's, rounded once to fp16, split where kiln fuses.
    def same16(hf_name, ref):
        expected.add(hf_name)
        assert hf[hf_name].dtype == np.float16
        assert np.array_equal(hf[hf_name], ref.astype(np.float32).astype(np.float16)), hf_name
    same16("model.embed_tokens.weight", kiln["tok_embeddings.weight"])
    same16("model.norm.weight", kiln["norm.weight"])
    if not sp["tie_word_embeddings"]:
        same16("lm_head.weight", kiln["lm_head.weight"])
    for i in range(sp["num_layers"]):
        L = f"model.layers.{i}."
        same16(L + "input_layernorm.weight", kiln[f"layers.{i}.attn_norm.weight"])
        same16(L + "post_attention_layernorm.weight", kiln[f"layers.{i}.ffn_norm.weight"])
        if sp["qk_norm"]:
            same16(L + "self_attn.q_norm.weight", kiln[f"layers.{i}.attn.q_norm.weight"])
            same16(L + "self_attn.k_norm.weight", kiln[f"layers.{i}.attn.k_norm.weight"])
        for mod, flag in (("attn.qkv", "qkv_bias"), ("attn.o", "o_bias"), ("ffn.gate_up", "mlp_bias"),
                          ("ffn.down", "mlp_bias")):
            if sp[flag]:
                bias, row = kiln[f"layers.{i}.{mod}.bias"], 0
                for proj, rows in zip(PROJ[mod], part_rows(sp)[mod]):
                    same16(L + proj + ".bias", bias[row:row + rows])
                    row += rows
    assert set(hf) == expected
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ex / f).exists(), f


@pytest.mark.parametrize("name", ["llama-bias-linear-rope", "qwen2-bf16-sharded", "qwen3-bf16-tied"])
def test_exported_checkpoint_runs_in_transformers(name, pipeline, tmp_path):
    """transformers reads the exported config.json; with the layout dequantized in numpy it computes the logits of
    the workspace kiln convert makes from the export."""
    _, _, ex = pipeline(name)
    cfg = AutoConfig.from_pretrained(ex)
    assert cfg.quantization_config["quant_method"] == "awq"
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf = load_dir(ex, "model*.safetensors")
    state = {}
    for k, v in hf.items():
        if k.endswith(".qweight"):
            b = k[:-len(".qweight")]
            state[b + ".weight"] = torch.from_numpy(awq_dequantize(v, hf[b + ".qzeros"], hf[b + ".scales"], GS).copy())
        elif not k.endswith((".qzeros", ".scales")):
            state[k] = torch.from_numpy(v.astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    int8 = kiln_int8_activations(GS)
    if int8:
        round_linear_inputs_int8(model, GS)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    back = tmp_path / "back"
    run_kiln("convert", ex, "-o", back)
    eval_logits_last = eval_logits(back, tmp_path, IDS)
    diff = float(np.abs(eval_logits_last - ref).max())
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert int8_logits_close(eval_logits_last, ref, TOL) if int8 else diff <= TOL


# --- 2. import of an AutoAWQ checkpoint built independently --------------------------------------------------------
def build_autoawq_checkpoint(src, dst, gs, shard=False):
    """An AutoAWQ GEMM checkpoint of the fixture `src`, made here: per group scale = (max - min) / 15 (min/max
    extended to include 0), zero = -round(min / scale), codes round(w / scale) + zero, clamped to [0, 15]; scales
    fp16. Returns the dequantized fp32 weight of every quantized linear (HF names)."""
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_dir(src, "*.safetensors")
    out, deq = {}, {}
    for k, w in tensors.items():
        if k.endswith("_proj.weight") and ".layers." in k:
            b = k[:-len(".weight")]
            g = w.astype(np.float32).reshape(w.shape[0], -1, gs)
            lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
            s = ((hi - lo) / 15).astype(np.float16)
            s32 = s.astype(np.float32)
            z = np.clip(-np.round(lo / s32), 0, 15)
            q = np.clip(np.round(g / s32[..., None]) + z[..., None], 0, 15).astype(np.uint8).reshape(w.shape)
            out[b + ".qweight"] = awq_pack(q.T.copy())
            out[b + ".qzeros"] = awq_pack(z.astype(np.uint8).T.copy())
            out[b + ".scales"] = s.T.copy()
            deq[b + ".weight"] = ((q.reshape(g.shape) - z[..., None]) * s32[..., None]).reshape(w.shape)
        else:
            out[k] = w.astype(np.float16)
    dst.mkdir()
    names = sorted(out)
    if shard:
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for f, ns in parts.items():
            save_file({n: out[n] for n in ns}, str(dst / f), metadata={"format": "pt"})
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}))
    else:
        save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "awq", "w_bit": 4, "q_group_size": gs, "zero_point": True,
                                  "version": "GEMM"}  # AutoAWQ's own key spelling
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("generation_config.json",):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    copy_tokenizer(src, dst)
    return deq


@pytest.fixture(scope="module")
def autoawq_checkpoint(fixture_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("awqsrc")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (root / name, build_autoawq_checkpoint(fixture_models / name, root / name, GS,
                                                                 shard="sharded" in name))
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["llama-fp32-sharded", "mistral-fp32-sharded", "qwen2-bf16-sharded", "qwen3-fp32"])
def test_import_matches_transformers(name, fixture_models, autoawq_checkpoint, tmp_path):
    src, deq = autoawq_checkpoint(name)
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws)
    run_kiln("verify", ws)
    doc = json.loads((ws / "kiln.json").read_text())
    w = doc["quantization"]["weights"]
    assert (w["method"], w["bits"], w["group_size"], doc["dtype"]) == ("awq", 4, GS, "fp16")
    assert w["imported_from"]["format"] == "autoawq-gemm"
    model = AutoModelForCausalLM.from_pretrained(fixture_models / name, dtype=torch.float32).float().eval()
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.from_numpy(deq[k]) if k in deq else p.half().float())
    int8 = kiln_int8_activations(GS)
    if int8:
        round_linear_inputs_int8(model, GS)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    eval_logits_last = eval_logits(ws, tmp_path, IDS)
    diff = float(np.abs(eval_logits_last - ref).max())
    print(f"{name}: max |logit diff| = {diff:.3g}")
    assert int8_logits_close(eval_logits_last, ref, TOL) if int8 else diff <= TOL
    # Greedy generation from a text prompt is transformers' greedy generation with the same weights.
    gen = json.loads(run_kiln("generate", ws, "--prompt", "Hello", "-n", 8, "--temperature", 0, "--kv-cache", "fp32",
                              "--json").stdout)
    hf, safe = greedy(model, gen["prompt_token_ids"], 8)
    assert safe >= 6 and gen["token_ids"][:safe] == hf[:safe], (gen["token_ids"], hf, safe)


def test_import_of_legacy_quant_config_json(autoawq_checkpoint, tmp_path):
    """AutoAWQ before its transformers integration kept its settings in quant_config.json only."""
    src, _ = autoawq_checkpoint("qwen3-fp32")
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    q = cfg.pop("quantization_config")
    del q["quant_method"]
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "quant_config.json").write_text(json.dumps(q))
    run_kiln("convert", src, "-o", tmp_path / "a")
    run_kiln("convert", legacy, "-o", tmp_path / "b")
    a, b = load_dir(tmp_path / "a", "weights-*"), load_dir(tmp_path / "b", "weights-*")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    doc = json.loads((tmp_path / "b" / "kiln.json").read_text())
    assert "quant_config.json" in doc["provenance"]["source_files"]
    q["version"] = "gemv"
    (legacy / "quant_config.json").write_text(json.dumps(q))
    one_line_error(run_kiln("convert", legacy, "-o", tmp_path / "c", check=False), "quant_config.json")
    r = run_kiln("generate", legacy, "--prompt", "Hi", "-n", 2, check=False)
    one_line_error(r, "kiln convert")


# --- 3. round trip ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,method", [("llama-fp32-sharded", "rtn"), ("qwen2-bf16-sharded", "rtn"),
                                         ("qwen3-fp32", "awq")])
def test_round_trip_is_lossless(name, method, pipeline, tmp_path):
    _, q, ex = pipeline(name, "fp16", method)
    back = tmp_path / "back"
    run_kiln("convert", ex, "-o", back)
    run_kiln("verify", back)
    a, b = load_dir(q, "weights-*.safetensors"), load_dir(back, "weights-*.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert spec(q) == spec(back)
    assert np.array_equal(eval_logits(q, tmp_path, IDS), eval_logits(back, tmp_path, IDS))
    # Exporting again, from either side, gives the same bytes (determinism).
    again = tmp_path / "again"
    run_kiln("export", back, "--format", "autoawq", "-o", again, "--shard-size-mb", 1 if "sharded" in name else 4096)
    assert sorted(p.name for p in ex.iterdir()) == sorted(p.name for p in again.iterdir())
    for f in ex.iterdir():
        assert f.read_bytes() == (again / f.name).read_bytes(), f.name


# --- AutoAWQ's own code as a second oracle ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def autoawq():
    """AutoAWQ's pure-torch GEMM modules (installed by scripts/setup.sh without dependencies). awq/__init__.py
    imports its whole model zoo (datasets, an old transformers), so only the packages on the way are stubbed."""
    spec = importlib.util.find_spec("awq")
    if spec is None:
        pytest.skip("autoawq is not installed (scripts/setup.sh installs it)")
    root = Path(spec.origin).parent
    saved = {k: sys.modules.get(k) for k in ("awq", "awq.utils", "awq.modules", "awq.modules.linear")}
    for pkg, sub in (("awq", ""), ("awq.utils", "utils"), ("awq.modules", "modules"),
                     ("awq.modules.linear", "modules/linear")):
        m = types.ModuleType(pkg)
        m.__path__ = [str(root / sub)]
        sys.modules[pkg] = m
    mods = types.SimpleNamespace(gemm=importlib.import_module("awq.modules.linear.gemm"),
                                 packing=importlib.import_module("awq.utils.packing_utils"))
    yield mods
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


@pytest.mark.parametrize("name", ["llama-fp32-sharded", "qwen2-bf16-sharded"])
def test_export_unpacks_with_autoawq_code(name, pipeline, autoawq):
    """AutoAWQ's unpack (unpack_awq + reverse_awq_order) gives kiln's codes and zeros; its dequantize_gemm (fp16)
    gives kiln's dequantized weights rounded once to fp16."""
    _, q, ex = pipeline(name)
    kiln, sp = load_dir(q, "weights-*.safetensors"), spec(q)
    from safetensors.torch import load_file as lt
    hf = {}
    for f in sorted(ex.glob("model*.safetensors")):
        hf.update(lt(str(f)))
    for i in range(sp["num_layers"]):
        for mod, projs in PROJ.items():
            qw = kiln[f"layers.{i}.{mod}.qweight"]
            codes = np.stack([qw & 0xF, qw >> 4], axis=-1).reshape(qw.shape[0], -1)
            zeros = kiln[f"layers.{i}.{mod}.zeros"]
            w = kiln_dequantize(qw, kiln[f"layers.{i}.{mod}.scales"], zeros, GS)
            row = 0
            for proj, rows in zip(projs, part_rows(sp)[mod]):
                b = f"model.layers.{i}.{proj}"
                iw, iz = autoawq.packing.unpack_awq(hf[b + ".qweight"], hf[b + ".qzeros"], 4)
                iw, iz = autoawq.packing.reverse_awq_order(iw, iz, 4)
                assert np.array_equal((iw & 15).numpy().T, codes[row:row + rows]), b
                assert np.array_equal((iz & 15).numpy().T, zeros[row:row + rows]), b
                d = autoawq.packing.dequantize_gemm(hf[b + ".qweight"], hf[b + ".qzeros"], hf[b + ".scales"], 4, GS)
                assert d.dtype == torch.float16
                assert np.array_equal(d.numpy().T, w[row:row + rows].astype(np.float16)), b
                row += rows


def test_import_of_checkpoint_packed_by_autoawq(fixture_models, autoawq, tmp_path):
    """Every linear packed by AutoAWQ's WQLinear_GEMM.from_linear (its own packer) from known codes, zeros and
    scales; kiln convert must give exactly those codes, zeros and scales back."""
    src = fixture_models / "qwen3-fp32"
    rng = np.random.default_rng(3)
    tensors, truth = {}, {}
    for k, w in load_dir(src, "*.safetensors").items():
        if not (k.endswith("_proj.weight") and ".layers." in k):
            tensors[k] = w.astype(np.float16)
            continue
        out, n = w.shape
        codes = rng.integers(0, 16, size=(out, n)).astype(np.uint8)
        zeros = rng.integers(0, 16, size=(out, n // GS)).astype(np.uint8)
        scales = (rng.random((out, n // GS)) * 0.01 + 1e-3).astype(np.float16)
        deq = (codes.astype(np.float32) - np.repeat(zeros, GS, 1)) * np.repeat(scales.astype(np.float32), GS, 1)
        lin = torch.nn.Linear(n, out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(deq))
        # from_linear takes scales and zeros as [in/G, out] (AutoAWQ's quantizer transposes them before the call).
        m = autoawq.gemm.WQLinear_GEMM.from_linear(lin, 4, GS, scales=torch.from_numpy(scales.T.copy()),
                                                    zeros=torch.from_numpy(zeros.T.astype(np.float32).copy()))
        b = k[:-len(".weight")]
        for part in ("qweight", "qzeros", "scales"):
            tensors[f"{b}.{part}"] = getattr(m, part).numpy()
        truth[b] = (codes, zeros, scales)
    d = tmp_path / "awq"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GS, "zero_point": True,
                                  "version": "gemm"}
    (d / "config.json").write_text(json.dumps(cfg))
    copy_tokenizer(src, d)
    ws = tmp_path / "ws"
    run_kiln("convert", d, "-o", ws)
    kiln, sp = load_dir(ws, "weights-*.safetensors"), spec(ws)
    for i in range(sp["num_layers"]):
        for mod, projs in PROJ.items():
            qw = kiln[f"layers.{i}.{mod}.qweight"]
            codes = np.stack([qw & 0xF, qw >> 4], axis=-1).reshape(qw.shape[0], -1)
            got = (codes, kiln[f"layers.{i}.{mod}.zeros"], kiln[f"layers.{i}.{mod}.scales"])
            want = [np.concatenate([truth[f"model.layers.{i}.{p}"][j] for p in projs]) for j in range(3)]
            for g, w_ in zip(got, want):
                assert np.array_equal(g, w_), (i, mod)


# --- 4. refusals -----------------------------------------------------------------------------------------------------
def one_line_error(r, words):
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr, r.stderr


@pytest.mark.parametrize("change,words", [
    ({"version": "gemv"}, "GEMM layout"),
    ({"version": "marlin"}, "GEMM layout"),
    ({"version": "exllama"}, "GEMM layout"),
    ({"w_bit": 8}, "4-bit"),
    ({"zero_point": False}, "zero_point is false"),
    ({"q_group_size": 48}, "does not divide"),
    ({"q_group_size": -1}, "per-channel"),
    ({"modules_to_not_convert": ["q_proj"]}, "modules_to_not_convert"),
    ({"quant_method": "gptq"}, "not supported"),
])
def test_import_refusals(change, words, autoawq_checkpoint, tmp_path):
    src, _ = autoawq_checkpoint("qwen3-fp32")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    one_line_error(run_kiln("convert", bad, "-o", out, check=False), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no staging directory


def test_import_refuses_fp16_linear_and_bad_shapes(autoawq_checkpoint, tmp_path):
    src, _ = autoawq_checkpoint("qwen3-fp32")
    t = load_file(str(src / "model.safetensors"))
    b = "model.layers.1.mlp.up_proj"
    unq = dict(t)
    for p in (".qweight", ".qzeros", ".scales"):
        del unq[b + p]
    unq[b + ".weight"] = np.zeros((128, 64), np.float16)
    wrong = dict(t)
    wrong[b + ".scales"] = t[b + ".scales"].astype(np.float32)
    for label, tensors, words in (("unq", unq, "stored unquantized"), ("wrong", wrong, "AutoAWQ GEMM layout needs")):
        d = tmp_path / label
        shutil.copytree(src, d)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        one_line_error(run_kiln("convert", d, "-o", tmp_path / (label + ".ws"), check=False), words)
        assert not (tmp_path / (label + ".ws")).exists()


def test_export_refusals(pipeline, tmp_path):
    ws, q, _ = pipeline("qwen3-bf16-tied")
    out = tmp_path / "out"
    one_line_error(run_kiln("export", ws, "--format", "autoawq", "-o", out, check=False), "not quantized")
    out.mkdir()
    one_line_error(run_kiln("export", q, "--format", "autoawq", "-o", out, check=False), "exists")
    assert list(out.iterdir()) == []
    r = run_kiln("export", q, "--format", "gguf", "-o", tmp_path / "g", check=False)
    assert r.returncode != 0 and not (tmp_path / "g").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refuses_values_beyond_fp16(fixture_models, tmp_path):
    """A bf16 norm weight of 1e5 has no fp16 value: the export names the tensor instead of writing inf."""
    from safetensors.torch import load_file as lt, save_file as st
    src = fixture_models / "llama-bf16"
    big = tmp_path / "big"
    shutil.copytree(src, big)
    f = next(big.glob("*.safetensors"))
    t = lt(str(f))
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], 1e5)
    st(t, str(f), metadata={"format": "pt"})
    run_kiln("convert", big, "-o", tmp_path / "ws")
    run_kiln("quantize", tmp_path / "ws", "-o", tmp_path / "q", "--method", "rtn", "--group-size", GS)
    one_line_error(run_kiln("export", tmp_path / "q", "--format", "autoawq", "-o", tmp_path / "ex", check=False),
                   "model.norm.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "q", "ws"]
