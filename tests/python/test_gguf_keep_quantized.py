"""kiln convert FILE.gguf --keep-quantized: Q4_0 (and Q4_1 whose m is -z*d) linear weights kept as kiln int4, and a
Q8_0 head (or tied embedding) kept as kiln's int8 head.

- The kept int4 tensors, dequantized by docs/int4_layout.md's formula w = (q - zero) * scale in fp32, equal the `gguf`
  package's own dequantization of the file's blocks bit for bit (q/k rows un-permuted for Llama).
- The workspace's logits equal those of the same file converted without the flag (dequantized to fp32), up to the
  summation order of the int4 and fp32 kernels (fp32 activations: KILN_CPU_ISA=scalar).
- Types without an exact int4 form (Q4_1 with an arbitrary m, K-quants, ...) and HF sources are refused in one line.
"""
import json
import os

import numpy as np
import pytest

from conftest import run_kiln

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import gguf_fixtures as fx  # noqa: E402

IDS = [256, 10, 77, 3, 258, 200, 41, 99, 257, 12, 5, 180]


def tensors(ws):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(ws.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def int4_dequantized(t, name):
    """docs/int4_layout.md: codes two per byte (even input in the low nibble), w = (q - zero) * scale in fp32."""
    packed, scales, zeros = t[name + ".qweight"], t[name + ".scales"], t[name + ".zeros"]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32)
    group = q.shape[1] // scales.shape[1]
    z = np.repeat(zeros.astype(np.float32), group, axis=1)
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    return (q - z) * s


def unpermute(w, heads):
    """The inverse of llama.cpp's q/k interleaving (fx.llama_permute)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def logits(ws, tmp_path):
    from safetensors.numpy import load_file
    ids, out = tmp_path / "ids.json", tmp_path / f"{ws.name}.logits.safetensors"
    ids.write_text(json.dumps(IDS))
    env = dict(os.environ, KILN_CPU_ISA="scalar")  # fp32 activations in the int4 kernel (no int8 path)
    run_kiln("eval", ws, "--tokens", ids, "--ctx", len(IDS), "--kv-cache", "fp32", "--save-logits", out, env=env)
    return load_file(str(out))["logits"]


def exact_q4_1_blocks(values, rng):
    """Q4_1 blocks (d, m, 16 code bytes) whose m is exactly -z*d for an integer zero point z, so they have an int4
    form: d a small multiple of 2^-12 (z*d is then exact in fp16), codes and z random."""
    rows, cols = values.shape
    n = rows * cols // 32
    d = (rng.integers(1, 64, size=n) * 2.0**-12).astype(np.float16)
    z = rng.integers(0, 16, size=n)
    m = (-z * d.astype(np.float64)).astype(np.float16)
    assert np.array_equal(m.astype(np.float64), -z * d.astype(np.float64))
    codes = rng.integers(0, 16, size=(n, 32), dtype=np.uint8)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), m.view(np.uint8).reshape(n, 2),
                             codes[:, :16] | (codes[:, 16:] << 4)], axis=1)
    return blocks.reshape(rows, cols // 32 * 20)


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_0), ("qwen2", T.Q4_0), ("qwen3", T.Q4_1)],
                         ids=lambda v: getattr(v, "name", v))
def test_kept_int4_is_the_files_blocks(arch, qtype, tmp_path, monkeypatch):
    path = tmp_path / f"{arch}.gguf"
    if qtype == T.Q4_1:
        rng = np.random.default_rng(5)
        monkeypatch.setattr(fx, "encode", lambda v, t, _rng: (exact_q4_1_blocks(v, rng), t) if t == T.Q4_1
                            else (v.astype(np.float16 if t == T.F16 else np.float32), None))
    stored = fx.write_model(path, arch, qtype, embed_qtype=T.F16, seed=11)
    kept, plain = tmp_path / "kept", tmp_path / "plain"
    run_kiln("convert", path, "-o", kept, "--keep-quantized", "--dtype", "fp32")
    run_kiln("convert", path, "-o", plain, "--dtype", "fp32")
    doc = json.loads((kept / "kiln.json").read_text())
    w = doc["quantization"]["weights"]
    assert (w["method"], w["bits"], w["group_size"], w["zero_point"]) == ("rtn", 4, 32, True)
    assert w["imported_from"]["format"] == "gguf"
    t, p = tensors(kept), tensors(plain)
    ref = lambda name: fx.dequantized(*stored[name])
    heads = {"q": fx.HEADS, "k": fx.KV_HEADS, "v": 0}
    for i in range(fx.LAYERS):
        parts = [ref(f"blk.{i}.attn_{x}.weight") for x in "qkv"]
        if arch == "llama":
            parts = [unpermute(w_, heads[x]) if heads[x] else w_ for w_, x in zip(parts, "qkv")]
        want = {"attn.qkv": np.concatenate(parts), "attn.o": ref(f"blk.{i}.attn_output.weight"),
                "ffn.gate_up": np.concatenate([ref(f"blk.{i}.ffn_gate.weight"), ref(f"blk.{i}.ffn_up.weight")]),
                "ffn.down": ref(f"blk.{i}.ffn_down.weight")}
        for module, values in want.items():
            name = f"layers.{i}.{module}"
            assert f"{name}.weight" not in t
            got = int4_dequantized(t, name)
            np.testing.assert_array_equal(got, values, err_msg=name)
            np.testing.assert_array_equal(got, p[f"{name}.weight"], err_msg=name)
    np.testing.assert_array_equal(t["tok_embeddings.weight"], p["tok_embeddings.weight"])
    diff = float(np.abs(logits(kept, tmp_path) - logits(plain, tmp_path)).max())
    print(f"{arch} {qtype.name}: max |logit diff| kept int4 vs dequantized fp32 {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_q8_0_head_is_kept_as_the_int8_head(tied, tmp_path):
    """llama.cpp's Q4 files carry their head (or tied embedding) in Q8_0, which is kiln's int8 head block: kept, its
    codes and fp16 scales are the file's bytes; kiln's own quantizer (`quantize --head int8` of the dequantized
    conversion) picks the same bytes; the embedding of a tied model is dequantized as usual."""
    path = tmp_path / "m.gguf"
    stored = fx.write_model(path, "llama", T.Q4_0, embed_qtype=T.Q8_0, seed=4, tied=tied, head_qtype=T.Q8_0)
    head_name = "token_embd.weight" if tied else "output.weight"
    kept, plain, requant = tmp_path / "kept", tmp_path / "plain", tmp_path / "requant"
    run_kiln("convert", path, "-o", kept, "--keep-quantized", "--dtype", "fp32")
    run_kiln("convert", path, "-o", plain, "--dtype", "fp32")
    doc = json.loads((kept / "kiln.json").read_text())
    assert doc["quantization"]["head"]["dtype"] == "int8"
    t, p = tensors(kept), tensors(plain)
    data, qtype = stored[head_name]
    blocks = data.reshape(-1, 34)
    rows = t["lm_head.qweight"].shape[0]
    np.testing.assert_array_equal(t["lm_head.scales"].view(np.uint16).reshape(-1),
                                  blocks[:, :2].copy().view(np.uint16).reshape(-1))
    np.testing.assert_array_equal(t["lm_head.qweight"].reshape(-1), blocks[:, 2:].copy().view(np.int8).reshape(-1))
    assert rows == fx.dequantized(data, qtype).shape[0]
    np.testing.assert_array_equal(t["tok_embeddings.weight"], p["tok_embeddings.weight"])
    assert "lm_head.weight" not in t
    run_kiln("quantize", plain, "-o", requant, "--method", "rtn", "--group-size", "32", "--head", "int8")
    r = tensors(requant)
    np.testing.assert_array_equal(r["lm_head.qweight"], t["lm_head.qweight"])
    np.testing.assert_array_equal(r["lm_head.scales"], t["lm_head.scales"])
    # The workspace runs: its logits are the dequantized conversion's up to the int8 rounding of the head's input
    # (per 32 inputs, d = max|x| / 127: a relative error of at most 1/254 per block, ~1e-2 on these logits).
    a, b = logits(kept, tmp_path), logits(plain, tmp_path)
    diff = float(np.abs(a - b).max())
    print(f"kept Q8_0 head ({'tied' if tied else 'untied'}): max |logit diff| vs dequantized fp32 {diff:.2e}")
    assert diff <= 0.05 and np.array_equal(a.argmax(-1), b.argmax(-1))


def test_types_without_an_exact_int4_form_are_refused(tmp_path):
    cases = [(T.Q4_1, "is Q4_1 whose block"), (T.Q4_K, "is Q4_K, which kiln's int4 layout does not hold exactly"),
             (T.Q8_0, "is Q8_0")]
    for qtype, message in cases:
        path = tmp_path / f"{qtype.name}.gguf"
        fx.write_model(path, "qwen2", qtype, embed_qtype=T.F16, seed=2)
        p = run_kiln("convert", path, "-o", tmp_path / "out", "--keep-quantized", check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert message in p.stderr and "blk.0.attn_q.weight" in p.stderr and path.name in p.stderr, p.stderr
        assert not (tmp_path / "out").exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    p = run_kiln("convert", hf, "-o", tmp_path / "out", "--keep-quantized", check=False)
    assert p.returncode != 0 and "--keep-quantized applies to GGUF files" in p.stderr, p.stderr


@pytest.mark.parametrize("name", ["mixtral", "gpt2"])
def test_kept_int4_of_other_families(name, tmp_path, monkeypatch):
    """Stacked experts (a row range of a 3-D tensor), fused qkv and GPT-2's non-gated MLP: each
    family's Q4_0 file kept as int4 gives the logits of its dequantized conversion."""
    import test_gguf_families as fam
    plain_add = fam.Writer.add

    def add_q4_0(self, tensor_name, t):
        linear = t.dim() >= 2 and tensor_name.startswith("blk.") and "gate_inp" not in tensor_name
        if not linear:
            return plain_add(self, tensor_name, t)
        self.w.add_tensor(tensor_name, gguf.quants.quantize(fam.np32(t), T.Q4_0), raw_dtype=T.Q4_0)

    monkeypatch.setattr(fam.Writer, "add", add_q4_0)
    arch, model, writer, _ = fam.make_model(name)
    path = tmp_path / f"{name}.gguf"
    writer(path, model, arch)
    kept, plain = tmp_path / "kept", tmp_path / "plain"
    run_kiln("convert", path, "-o", kept, "--keep-quantized", "--dtype", "fp32")
    run_kiln("convert", path, "-o", plain, "--dtype", "fp32")
    t = tensors(kept)
    assert any(k.endswith(".qweight") for k in t) and not any(k.endswith("experts.0.down.weight") for k in t)
    diff = float(np.abs(logits(kept, tmp_path) - logits(plain, tmp_path)).max())
    print(f"{name} Q4_0: max |logit diff| kept int4 vs dequantized fp32 {diff:.2e}")
    assert diff <= 1e-4
