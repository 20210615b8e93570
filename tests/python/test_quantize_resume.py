"""kiln quantize --resume (docs/quantization.md "Resuming") and the layer-streamed quality report.

A run with --resume keeps each finished layer's results in its staging directory. The test hook
KILN_TEST_SIGNAL_AFTER_LAYER=K:SIG makes kiln send itself SIG once layer K is saved, so a run is cut at an exact
layer by a real SIGKILL, SIGINT or SIGTERM. The resumed output must be byte-identical to an uninterrupted run without
--resume. A resume state made with other options is refused, and a damaged layer file is recomputed.

The quality report (--eval-text) runs both models one layer at a time; its numbers must be those of `kiln eval`,
which runs the whole model (Model::forward), with --ref-logits saved from the input."""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import DATA, copy_tokenizer, progress_lines, run_kiln

CALIB = DATA / "text" / "devils_dictionary_calib.txt"
EVAL = DATA / "text" / "devils_dictionary_eval.txt"
LAYERS = 4


@pytest.fixture(scope="module")
def ws(tmp_path_factory, fixture_models):
    """A 4-layer Llama (hidden 64, GQA) with random weights, converted."""
    root = tmp_path_factory.mktemp("resume")
    hf = root / "hf"
    hf.mkdir()
    rng = np.random.default_rng(7)
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)
    H, I, V = 64, 128, 32000
    t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": 1 + w(H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(H, H)
        t[p + "self_attn.k_proj.weight"] = w(H // 2, H)
        t[p + "self_attn.v_proj.weight"] = w(H // 2, H)
        t[p + "self_attn.o_proj.weight"] = w(H, H)
        t[p + "mlp.gate_proj.weight"] = w(I, H)
        t[p + "mlp.up_proj.weight"] = w(I, H)
        t[p + "mlp.down_proj.weight"] = w(H, I)
        t[p + "input_layernorm.weight"] = 1 + w(H)
        t[p + "post_attention_layernorm.weight"] = 1 + w(H)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": LAYERS, "vocab_size": V,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    t["lm_head.weight"] = w(V, H)
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config))
    copy_tokenizer(fixture_models / "llama-fp32-sharded", hf)
    run_kiln("convert", hf, "-o", root / "ws")
    return root / "ws"


RTN = ("--method", "rtn", "--group-size", 32, "--json")
AWQ = ("--method", "awq", "--group-size", 32, "--data", CALIB, "--samples", 3, "--seqlen", 32, "--awq-grid", 4,
       "--awq-loss-samples", 2, "--json")


def digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}


def staging_dirs(d, name="q"):
    return sorted(d.glob(f".{name}.kiln-tmp-*"))


def cut(ws, out, args, layer, sig):
    """A --resume run stopped by `sig` once layer `layer` is saved; returns its stderr."""
    env = dict(os.environ, KILN_TEST_SIGNAL_AFTER_LAYER=f"{layer}:{sig}")
    r = run_kiln("quantize", ws, "-o", out, *args, "--resume", env=env, check=False)
    assert r.returncode == (-signal.SIGKILL if sig == "KILL" else 130), r.stderr
    assert not out.exists()
    [staging] = staging_dirs(out.parent, out.name)
    state = json.loads((staging / "resume" / "state.json").read_text())
    assert [layer_["record"]["layer"] for layer_ in state["layers"]] == list(range(layer + 1))
    if sig != "KILL":  # an orderly stop says where the results are and how to continue
        assert f"{layer + 1} of {LAYERS} layers are finished and kept in" in r.stderr, r.stderr
    return staging


def resume(ws, out, args, resumed):
    r = run_kiln("quantize", ws, "-o", out, *args, "--resume")
    assert json.loads(r.stdout)["resumed_layers"] == resumed, r.stderr
    if "awq" in args:
        # --json: one progress line per layer searched by this run; the ETA from this run's layers only.
        lines = progress_lines(r.stderr, "awq search")
        assert [x["done"] for x in lines] == list(range(resumed + 1, LAYERS + 1)), r.stderr
        for x in lines:
            assert x["resumed"] == resumed and x["total"] == LAYERS
            eta = x["seconds"] / (x["done"] - resumed) * (LAYERS - x["done"])
            assert x["eta_seconds"] == pytest.approx(eta, abs=0.002 * LAYERS), x
    assert (f"resuming {out} at layer {resumed} of {LAYERS}" in r.stderr) == (resumed > 0), r.stderr
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], list(out.parent.iterdir())
    assert not (out / "resume").exists()
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def uninterrupted(ws, tmp_path_factory):
    """The reference outputs: plain runs without --resume."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, args in (("rtn", RTN), ("awq", AWQ), ("awq-q", (*AWQ, "--awq-inputs", "quantized"))):
        r = run_kiln("quantize", ws, "-o", root / name, *args)
        lines = progress_lines(r.stderr, "awq search")
        assert [x["done"] for x in lines] == (list(range(1, LAYERS + 1)) if name != "rtn" else []), r.stderr
        out[name] = digests(root / name)
    return out


@pytest.mark.parametrize("method,extra,sig,layer", [
    ("awq", (), "KILL", 1),
    ("awq", (), "INT", 0),
    ("rtn", (), "TERM", 2),
    ("awq", (), "KILL", LAYERS - 1),  # every layer finished: only the shards are left to write
    # The residual stream spilled to disk (2 KiB budget), inputs from the quantized earlier layers.
    ("awq-q", ("--max-memory", "2K"), "KILL", 2),
])
def test_resumed_output_is_byte_identical(ws, uninterrupted, tmp_path, method, extra, sig, layer):
    args = {"rtn": RTN, "awq": AWQ, "awq-q": (*AWQ, "--awq-inputs", "quantized")}[method] + extra
    cut(ws, tmp_path / "q", args, layer, sig)
    summary = resume(ws, tmp_path / "q", args, layer + 1)
    if method != "rtn":
        assert [x["layer"] for x in summary["awq_layers"]] == list(range(LAYERS))
        assert summary["awq_spilled"] == bool(extra)
    assert digests(tmp_path / "q") == uninterrupted[method]


def test_other_options_are_refused_and_the_state_kept(ws, uninterrupted, tmp_path):
    cut(ws, tmp_path / "q", AWQ, 1, "KILL")
    for changed, field in (({"--group-size": 64}, "group_size"), ({"--seed": 5}, "seed"),
                           ({"--awq-inputs": "quantized"}, "inputs")):
        args = list(AWQ)
        for flag, value in changed.items():
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        r = run_kiln("quantize", ws, "-o", tmp_path / "q", *args, "--resume", check=False)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert "were made with a different " + field in lines[-1] and "without --resume" in lines[-1], r.stderr
        assert len(staging_dirs(tmp_path)) == 1 and not (tmp_path / "q").exists()
    # The same options still resume from the kept state.
    resume(ws, tmp_path / "q", AWQ, 2)
    assert digests(tmp_path / "q") == uninterrupted["awq"]


@pytest.mark.parametrize("method,recomputed_from", [("rtn", 1), ("awq", 0)])
def test_damaged_layer_file_is_recomputed(ws, uninterrupted, tmp_path, method, recomputed_from):
    args = RTN if method == "rtn" else AWQ
    staging = cut(ws, tmp_path / "q", args, 2, "KILL")
    layer_file = staging / "resume" / "layer-00001.bin"
    data = layer_file.read_bytes()
    layer_file.write_bytes(data[:len(data) // 2])  # truncated
    r = run_kiln("quantize", ws, "-o", tmp_path / "q", *args, "--resume")
    assert f"layer-00001.bin is damaged (it has {len(data) // 2} bytes, not {len(data)}); recomputing from layer " \
           f"{recomputed_from}" in r.stderr, r.stderr
    assert json.loads(r.stdout)["resumed_layers"] == recomputed_from
    assert digests(tmp_path / "q") == uninterrupted[method]
    # The same with the right size but other bytes.
    staging = cut(ws, tmp_path / "q2", args, 2, "KILL")
    layer_file = staging / "resume" / "layer-00001.bin"
    data = bytearray(layer_file.read_bytes())
    data[10] ^= 1
    layer_file.write_bytes(bytes(data))
    r = run_kiln("quantize", ws, "-o", tmp_path / "q2", *args, "--resume")
    assert "layer-00001.bin is damaged (its sha256 differs from the recorded one)" in r.stderr, r.stderr
    assert digests(tmp_path / "q2") == uninterrupted[method]


def test_without_resume_the_state_is_swept(ws, uninterrupted, tmp_path):
    staging = cut(ws, tmp_path / "q", RTN, 1, "KILL")
    r = run_kiln("quantize", ws, "-o", tmp_path / "q", *RTN)
    assert f"removed {staging}" in r.stderr and "kiln quantize:" not in r.stderr, r.stderr
    assert not staging_dirs(tmp_path) and digests(tmp_path / "q") == uninterrupted["rtn"]
    # --resume with nothing to resume says so and runs from layer 0.
    r = run_kiln("quantize", ws, "-o", tmp_path / "q3", *RTN, "--resume")
    assert "no finished layers to resume" in r.stderr and json.loads(r.stdout)["resumed_layers"] == 0
    assert digests(tmp_path / "q3") == uninterrupted["rtn"]
    r = run_kiln("quantize", ws, "-o", tmp_path / "q4", *RTN, "--resume", "--kv-cache", "int8", "--kv-mode", "online",
                 check=False)
    assert r.returncode == 1 and "--resume is not supported with --kv-cache int8" in r.stderr, r.stderr


@pytest.mark.parametrize("method,extra", [("rtn", ()), ("rtn", ("--kv-cache", "int8", "--kv-mode",
                                                                           "online"))])
def test_streamed_quality_report_matches_kiln_eval(ws, tmp_path, method, extra):
    """The layer-streamed report against the whole-model evaluation path: kiln eval with --ref-logits."""
    eval_args = ("--eval-ctx", 48, "--eval-tokens", 200)  # 4 full windows and a short one
    args = (RTN if method == "rtn" else AWQ) + extra
    report = json.loads(run_kiln("quantize", ws, "-o", tmp_path / "q", *args, "--eval-text", EVAL,
                                 *eval_args).stdout)["quality"]
    ref = tmp_path / "ref.logits"
    run_kiln("eval", ws, "--text", EVAL, "--ctx", 48, "--max-tokens", 200, "--save-logits", ref)
    ev = json.loads(run_kiln("eval", tmp_path / "q", "--text", EVAL, "--ctx", 48, "--max-tokens", 200, "--ref-logits",
                             ref, "--json").stdout)
    assert report["n_tokens"] == ev["n_tokens"] == 200 - 5
    for key in ("ppl", "ref_ppl", "kld_mean", "kld_p99", "kld_max", "top1_agreement", "ppl_ratio"):
        assert report[key] == pytest.approx(ev[key], rel=1e-5, abs=1e-9), (key, report, ev)
