"""kiln convert / inspect of GGUF files against the reference implementations.

- Parsing: `kiln inspect --json` of a file written by the `gguf` package's GGUFWriter (every metadata type, arrays,
  nested arrays, custom alignment) equals what the package's GGUFReader reads back.
- Dequantization: each tensor type, converted with --dtype fp32, equals gguf.quants.dequantize bit for bit.
- Mapping: tiny Llama (q/k rows interleaved as llama.cpp writes them), Qwen2 (biases) and Qwen3 (q/k norms) GGUFs,
  converted by kiln, give the logits transformers computes from the same file (`from_pretrained(gguf_file=)`).
- Tokenizer: the byte-level BPE rebuilt from tokenizer.ggml.* gives AutoTokenizer(gguf_file=)'s ids.
- Bad input: one line on stderr, exit 1, no output directory.
"""
import json

import numpy as np
import pytest

from conftest import run_kiln

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import gguf_fixtures as fx  # noqa: E402

ALL_TYPES = [T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K]


def kiln_tensors(ws):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(ws.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_inspect_reads_what_the_reference_writer_wrote(tmp_path):
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.data_alignment = 64
    w.add_uint32("general.alignment", 64)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**62)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 2.0**-60)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo\nworld")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", gguf.quants.quantize(np.ones((4, 64), np.float32), T.Q4_1), raw_dtype=T.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    got = json.loads(run_kiln("inspect", path, "--json").stdout)
    reader = gguf.GGUFReader(str(path))
    assert got["version"] == 3 and got["alignment"] == 64
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        want, have = field.contents(), got["metadata"][name]
        if field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY]:
            assert have == [[1, 2], [3]]
            have = [x for inner in have for x in inner]  # GGUFReader.contents() flattens nested arrays
        assert have == (pytest.approx(want) if isinstance(want, float) else want), name
    assert [(t["name"], t["type"], t["shape"]) for t in got["tensors"]] == [
        (t.name, t.tensor_type.name, [int(d) for d in reversed(t.shape)]) for t in reader.tensors]
    human = run_kiln("inspect", path).stdout
    assert "t.str" in human and "Q4_1" in human


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantization_is_bit_exact(qtype, tmp_path):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    stored = fx.write_model(path, "qwen2", qtype, embed_qtype=qtype, seed=int(qtype))
    ws = tmp_path / "ws"
    run_kiln("convert", path, "-o", ws, "--dtype", "fp32")
    t = kiln_tensors(ws)
    ref = lambda name: fx.dequantized(*stored[name])
    np.testing.assert_array_equal(t["layers.0.ffn.down.weight"], ref("blk.0.ffn_down.weight"))
    np.testing.assert_array_equal(t["layers.1.ffn.gate_up.weight"],
                                  np.concatenate([ref("blk.1.ffn_gate.weight"), ref("blk.1.ffn_up.weight")]))
    np.testing.assert_array_equal(t["tok_embeddings.weight"], ref("token_embd.weight"))
    np.testing.assert_array_equal(t["layers.0.attn.qkv.bias"],
                                  np.concatenate([ref(f"blk.0.attn_{p}.bias") for p in "qkv"]))
    # The default workspace dtype is bf16: the same values, rounded once.
    ws16 = tmp_path / "ws16"
    run_kiln("convert", path, "-o", ws16)
    import torch
    from safetensors.torch import load_file
    have = {}
    for f in ws16.glob("*.safetensors"):
        have.update(load_file(str(f)))
    want = torch.from_numpy(ref("blk.0.ffn_down.weight")).to(torch.bfloat16)
    assert have["layers.0.ffn.down.weight"].dtype == torch.bfloat16
    assert torch.equal(have["layers.0.ffn.down.weight"].view(torch.int16), want.view(torch.int16))


def transformers_logits(path, ids):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def kiln_logits(ws, tmp_path, ids):
    from safetensors.numpy import load_file
    tok = tmp_path / "ids.json"
    tok.write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", ws, "--tokens", tok, "--ctx", len(ids), "--kv-cache", "fp32", "--save-logits", out)
    return load_file(str(out))["logits"]


IDS = [256, 10, 77, 3, 258, 200, 41, 99, 257, 12, 5, 180]


@pytest.mark.parametrize("arch,qtype", [("llama", T.Q4_K), ("llama", T.Q8_0), ("qwen2", T.Q5_1), ("qwen3", T.Q6_K)],
                         ids=lambda v: getattr(v, "name", v))
def test_logits_match_transformers(arch, qtype, tmp_path):
    path = tmp_path / f"tiny-{arch}.gguf"
    # transformers reads no head_dim from a qwen3 GGUF and uses Qwen3's 128; real Qwen3 models have that, with
    # heads * head_dim != hidden, which kiln takes from attention.key_length.
    fx.write_model(path, arch, qtype, embed_qtype=T.F16, seed=3, head_dim=128 if arch == "qwen3" else None)
    ws = tmp_path / "ws"
    run_kiln("convert", path, "-o", ws, "--dtype", "fp32")
    spec = json.loads((ws / "kiln.json").read_text())["model"]
    assert spec["family"] == arch and spec["tie_word_embeddings"]
    got, want = kiln_logits(ws, tmp_path, IDS), transformers_logits(path, IDS)
    diff = float(np.abs(got - want).max())
    print(f"{arch} {qtype.name}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-3


def test_tokenizer_and_template_match_transformers(tmp_path):
    from transformers import AutoTokenizer
    path = tmp_path / "tiny.gguf"
    fx.write_model(path, "llama", T.Q8_0)
    ws = tmp_path / "ws"
    run_kiln("convert", path, "-o", ws)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["the theme", " the<|im_end|>x", "héllo wörld 123 ’quotes’", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        got = json.loads(run_kiln("tokenize", ws, "--text", text, "--json").stdout)["ids"]
        assert got == tok(text)["input_ids"], text
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"messages": msgs}))
    assert run_kiln("prompt", ws, "--messages", m).stdout == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def corrupt_variants(good: bytes):
    yield "truncated", good[: len(good) // 2]
    yield "bad magic", b"GGUX" + good[4:]
    lying = bytearray(good)
    lying[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    yield "absurd tensor count", bytes(lying)
    lying = bytearray(good)
    lying[16:24] = (2**40).to_bytes(8, "little")  # key/value count
    yield "absurd kv count", bytes(lying)
    lying = bytearray(good)
    lying[24:32] = (2**50).to_bytes(8, "little")  # length of the first key
    yield "string past the end", bytes(lying)


def test_bad_files_get_one_line_and_exit_1(tmp_path):
    path = tmp_path / "good.gguf"
    fx.write_model(path, "llama", T.Q8_0)
    good = path.read_bytes()
    for label, data in corrupt_variants(good):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        for args in (["inspect", bad], ["convert", bad, "-o", tmp_path / "out"]):
            p = run_kiln(*args, check=False)
            assert p.returncode == 1, (label, args[0], p.stderr)
            assert len(p.stderr.strip().splitlines()) == 1 and "bad.gguf" in p.stderr, (label, p.stderr)
        assert not (tmp_path / "out").exists()
    # An IQ tensor is refused by its type's name when converting.
    iq = tmp_path / "iq.gguf"
    fx.write_model(iq, "llama", T.Q8_0, iq_tensor="blk.1.ffn_up.weight")
    assert "IQ2_XXS" in run_kiln("inspect", iq).stdout
    p = run_kiln("convert", iq, "-o", tmp_path / "out", check=False)
    assert p.returncode == 1 and "IQ2_XXS" in p.stderr and "blk.1.ffn_up.weight" in p.stderr, p.stderr
