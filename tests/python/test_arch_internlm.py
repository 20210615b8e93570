"""InternLM (InternLMForCausalLM) and InternLM2 / 2.5 (InternLM2ForCausalLM) through convert, eval, generate,
quantize (RTN, AWQ, INT8 KV) and serve.

Oracle: transformers' LlamaForCausalLM. Each checkpoint here is a tiny seeded Llama whose state dict is written under
the family's own tensor names with a config.json in the family's own keys (as internlm-chat-7b and internlm2-chat-7b
ship them), as safetensors and as torch.save .bin. InternLM is Llama with q/k/v/o biases, so the same weights in
LlamaForCausalLM(attention_bias=True) are exact. InternLM2 packs q, k and v into one wqkv per KV group,
[n_kv, q_per_kv + 2, head_dim, hidden] (the rearrange "(h gs d)" of its modeling code); the test packs Llama's
q_proj / k_proj / v_proj that way, and checks the packing by unpacking it as InternLM2's code does.

Dynamic NTK RoPE: InternLM2 and transformers' Llama both rotate each new key with the base of the sequence length at
that step and keep cached keys as written, which kiln does too, so greedy decoding across max_position_embeddings is
exact. InternLM's modeling code (rotary.type dynamic) instead re-rotates every cached key with the newest base; the
two agree within max_position_embeddings and for any single forward (an eval window), which is what is tested here.
"""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, copy_tokenizer, convert_refused, run_kiln
from hf_oracle import cached_logits, greedy, int8_online_store

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
TOL = 1e-3  # as test_runtime.py: fp32 on both sides, summation order and exp/cos/sin differ by ~1e-5
MAX_POS = 128
INT8_ORACLE_TOL = 2 * 1.8e-3  # test_kv_int8.py's bound for kiln's int8 KV against transformers with the same scheme


def tiny_llama(seed, heads=4, kv_heads=4, bias=True, rope=None, theta=10000.0, hidden=64):
    """A seeded 2-layer LlamaForCausalLM (fp32) with every parameter, biases and norms included, set to noise."""
    from make_fixtures import randomize
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=MAX_POS,
                      rms_norm_eps=1e-6, attention_bias=bias, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": theta, **(rope or {})})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    randomize(model, seed)
    return model.eval()


def common_config(model, architecture, model_type):
    c = model.config
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": 1e-6,
            "initializer_range": 0.02, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "torch_dtype": "float32"}


def internlm_checkpoint(model, rotary):
    """InternLM's state dict (Llama's names) and config.json (its own keys: bias, rotary; no num_key_value_heads)."""
    cfg = common_config(model, "InternLMForCausalLM", "internlm")
    cfg.update(bias=model.config.attention_bias, rotary=rotary)
    return {k: v.contiguous() for k, v in model.state_dict().items()}, cfg


def pack_wqkv(q, k, v, kv_heads, head_dim):
    """Llama's q/k/v rows (weight [rows, hidden] or bias [rows]) in InternLM2's wqkv order: per KV group g, its
    queries g*G .. g*G + G-1, then key g, then value g."""
    group = q.shape[0] // head_dim // kv_heads
    tail = q.shape[1:]
    q = q.reshape(kv_heads, group, head_dim, *tail)
    k = k.reshape(kv_heads, 1, head_dim, *tail)
    v = v.reshape(kv_heads, 1, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).contiguous()


def unpack_wqkv_as_internlm2(wqkv, heads, kv_heads, head_dim):
    """InternLM2's own reading of wqkv: rows "(h gs d)" with gs = q_per_kv + 2; queries gs[:q_per_kv] flattened
    "(h gs)", key gs[-2], value gs[-1]."""
    gs = heads // kv_heads + 2
    x = wqkv.reshape(kv_heads, gs, head_dim, *wqkv.shape[1:])
    return (x[:, :gs - 2].reshape(heads * head_dim, *wqkv.shape[1:]), x[:, -2].reshape(-1, *wqkv.shape[1:]),
            x[:, -1].reshape(-1, *wqkv.shape[1:]))


def internlm2_checkpoint(model, rope_scaling):
    c = model.config
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    sd = model.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = L = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        kinds = ["weight", "bias"] if c.attention_bias else ["weight"]
        for kind in kinds:
            q, k, v = (sd[a + f"{x}_proj.{kind}"] for x in "qkv")
            out[L + f"attention.wqkv.{kind}"] = pack_wqkv(q, k, v, kv, hd)
            assert all(torch.equal(x, y) for x, y in zip(unpack_wqkv_as_internlm2(out[L + f"attention.wqkv.{kind}"],
                                                                                  heads, kv, hd), (q, k, v)))
            out[L + f"attention.wo.{kind}"] = sd[a + f"o_proj.{kind}"]
        out[L + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[L + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[L + "feed_forward.w1.weight"] = sd[m + "gate_proj.weight"]
        out[L + "feed_forward.w3.weight"] = sd[m + "up_proj.weight"]
        out[L + "feed_forward.w2.weight"] = sd[m + "down_proj.weight"]
    cfg = common_config(model, "InternLM2ForCausalLM", "internlm2")
    cfg.update(num_key_value_heads=kv, bias=c.attention_bias, rope_theta=c.rope_parameters["rope_theta"],
               rope_scaling=rope_scaling, attn_implementation="eager")
    return {k: v.contiguous() for k, v in out.items()}, cfg


def write_checkpoint(dst, state_dict, config, tokenizer_src, fmt="safetensors", extra_bin=None):
    """`fmt`: safetensors (model.safetensors), bin (torch.save pytorch_model.bin) or sharded-bin (pytorch_model-*.bin
    with pytorch_model.bin.index.json, as internlm-chat-7b ships). extra_bin: buffers only the .bin carries (InternLM's
    first revision saved rotary_emb.inv_freq)."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if fmt == "safetensors":
        save_file(state_dict, str(dst / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save({**state_dict, **(extra_bin or {})}, dst / "pytorch_model.bin")
    else:
        from huggingface_hub import save_torch_state_dict
        save_torch_state_dict({**state_dict, **(extra_bin or {})}, dst, safe_serialization=False,
                              max_shard_size="2MB")
        assert len(list(dst.glob("pytorch_model-*.bin"))) > 1
    copy_tokenizer(tokenizer_src, dst)
    return dst


class Family:
    """One family's tiny checkpoint (safetensors and .bin), its Llama oracle and converted workspaces."""

    def __init__(self, root, oracle, make, tokenizer, bin_fmt, extra_bin=None):
        self.oracle = oracle
        sd, self.config = make(oracle)
        self.src = write_checkpoint(root / "st", sd, self.config, tokenizer)
        self.bin_src = write_checkpoint(root / "bin", sd, self.config, tokenizer, bin_fmt, extra_bin)
        self.ws, self.bin_ws = root / "ws", root / "ws_bin"
        run_kiln("convert", self.src, "-o", self.ws)
        run_kiln("convert", self.bin_src, "-o", self.bin_ws)


@pytest.fixture(scope="module")
def internlm(real_tokenizers, tmp_path_factory):
    """internlm-chat-7b's shape in small: MHA, biases on q/k/v/o, rotary {base, type: dynamic}; its .bin sharded with
    the rotary_emb.inv_freq buffers of its first revision. Oracle: Llama with attention_bias and dynamic NTK, factor 1
    (InternLM's default scaling_factor)."""
    model = tiny_llama(seed=11, heads=4, kv_heads=4, bias=True, rope={"rope_type": "dynamic", "factor": 1.0})
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
                for i in range(2)}
    return Family(tmp_path_factory.mktemp("internlm"), model,
                  lambda m: internlm_checkpoint(m, {"base": 10000, "type": "dynamic"}),
                  real_tokenizers / "llama2", "sharded-bin", inv_freq)


@pytest.fixture(scope="module")
def internlm2(real_tokenizers, tmp_path_factory):
    """internlm2-chat-7b's shape in small: GQA (2 queries per KV head), no biases, rope_theta 1e6 and dynamic NTK
    factor 2. Oracle: Llama with the same rope_scaling."""
    scaling = {"type": "dynamic", "factor": 2.0}
    model = tiny_llama(seed=12, heads=4, kv_heads=2, bias=False, theta=1e6,
                       rope={"rope_type": "dynamic", "factor": 2.0})
    return Family(tmp_path_factory.mktemp("internlm2"), model, lambda m: internlm2_checkpoint(m, scaling),
                  real_tokenizers / "llama2", "bin")


FAMILIES = ["internlm", "internlm2"]


@pytest.fixture
def family(request):
    return request.getfixturevalue(request.param)


def token_ids(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(3, 31000, size=n)]


def kiln_logits(ws, ids, tmp_path, *extra):
    tok = tmp_path / "tokens.json"
    tok.write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", ws, "--tokens", tok, "--ctx", len(ids), "--save-logits", out, "--kv-cache", "fp32", *extra)
    data = load_np(str(out))
    assert data["tokens"].tolist() == ids
    return data["logits"]


def oracle_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
@pytest.mark.parametrize("length", [64, 200])  # within and past max_position_embeddings (128)
def test_logits_match_llama_oracle(family, length, tmp_path):
    """Safetensors and .bin give byte-identical workspaces whose logits are Llama's; past max_position_embeddings the
    dynamic NTK base is in play (the same model without it is far off)."""
    for f in sorted(family.ws.glob("weights-*.safetensors")):
        assert f.read_bytes() == (family.bin_ws / f.name).read_bytes()
    ids = token_ids(length, seed=length)
    ref = oracle_logits(family.oracle, ids)
    for ws in (family.ws, family.bin_ws):
        diff = float(np.abs(kiln_logits(ws, ids, tmp_path) - ref).max())
        print(f"{ws.parent.name} {ws.name} {length} tokens: max |logit diff| {diff:.3g}")
        assert diff <= TOL
    if length > MAX_POS:
        cfg = copy.deepcopy(family.oracle.config)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_parameters["rope_theta"]}
        plain = LlamaForCausalLM(cfg)
        plain.load_state_dict(family.oracle.state_dict())
        unscaled = float(np.abs(oracle_logits(plain.float().eval(), ids) - ref).max())
        print(f"the same model without dynamic NTK: max |logit diff| {unscaled:.3g}")
        assert unscaled > 20 * TOL


# (family, prompt length, prompt seed): seeds whose 32 greedy steps all have top-2 margins >= 1e-3 in transformers
@pytest.mark.parametrize("family,prompt_len,seed", [("internlm", 24, 31), ("internlm2", 110, 118)], indirect=["family"])
def test_greedy_32_tokens_match_llama_oracle(family, prompt_len, seed, tmp_path):
    """32 greedy tokens; InternLM2's cross max_position_embeddings (128) while decoding, so each step's key is rotated
    with a larger dynamic NTK base than the cached ones, as in transformers."""
    prompt = token_ids(prompt_len, seed=seed)
    want, safe = greedy(family.oracle, prompt, 32)
    tok = tmp_path / "p.json"
    tok.write_text(json.dumps(prompt))
    print(f"transformers {want} (margin-safe {safe})")
    assert len(want) == 32 and safe == 32, "the oracle's top-2 margins are too thin; pick another prompt"
    for path in (family.ws, family.src):  # the workspace, and the HF directory converted in memory
        got = json.loads(run_kiln("generate", path, "--tokens", tok, "-n", 32, "--kv-cache", "fp32", "--ctx", 512,
                                  "--json").stdout)["token_ids"]
        assert got == want, (path, got)


def test_internlm2_wqkv_unpacking_with_distinguishable_heads(real_tokenizers, tmp_path):
    """Every head's rows (weight and bias) hold its own number: query head h is 1 + h, key head g 100 + g, value
    head g 200 + g, in Llama's q/k/v tensors. Packed per KV group (4 queries per KV head) and converted, the
    workspace's attn.qkv must list the query heads in order, then the key heads, then the value heads."""
    model = tiny_llama(seed=3, heads=8, kv_heads=2, bias=True)
    hd = 8
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for proj, base, n in ((a.q_proj, 1, 8), (a.k_proj, 100, 2), (a.v_proj, 200, 2)):
                for h in range(n):
                    proj.weight[h * hd:(h + 1) * hd] = base + h
                    proj.bias[h * hd:(h + 1) * hd] = -(base + h)
    sd, cfg = internlm2_checkpoint(model, None)
    ws = tmp_path / "ws"
    run_kiln("convert", write_checkpoint(tmp_path / "hf", sd, cfg, real_tokenizers / "llama2"), "-o", ws)
    run_kiln("convert", tmp_path / "hf", "-o", tmp_path / "ws_bf16", "--dtype", "bf16")  # regrouped while converted
    want = [1 + h for h in range(8)] + [100, 101] + [200, 201]
    from safetensors.torch import load_file
    for w in (ws, tmp_path / "ws_bf16"):
        tensors = {k: v.float().numpy() for k, v in load_file(str(next(w.glob("weights-*.safetensors")))).items()}
        for i in range(2):
            qkv, bias = tensors[f"layers.{i}.attn.qkv.weight"], tensors[f"layers.{i}.attn.qkv.bias"]
            assert qkv.shape == (12 * hd, 64) and bias.shape == (12 * hd,)
            assert [float(qkv[j * hd, 0]) for j in range(12)] == want
            assert [float(-bias[j * hd]) for j in range(12)] == want
            assert all((qkv[j * hd:(j + 1) * hd] == want[j]).all() for j in range(12))


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_quantize_rtn_awq_int8_kv_and_serve(family, tmp_path):
    """RTN and AWQ int4 workspaces verify and stay close to the input (AWQ's folded scales alone leave the logits
    unchanged); the INT8 KV cache matches transformers with the same quantized cache; serve answers the openai client
    with what generate produces."""
    from test_serve import assert_serve_matches_generate
    ws = family.ws
    cal = ("--data", CALIB, "--samples", 8, "--seqlen", 64, "--seed", 1)
    quality = ("--eval-text", EVAL, "--eval-ctx", 64, "--eval-tokens", 256, "--json")
    for method, extra in (("rtn", ()), ("awq", cal)):
        out = tmp_path / method
        r = json.loads(run_kiln("quantize", ws, "-o", out, "--method", method, "--group-size", 32, *extra,
                                *quality).stdout)
        run_kiln("verify", out)
        print(method, r["quality"])
        assert r["quality"]["kld_mean"] < 0.5, r["quality"]  # random 64-wide models; a mis-wired int4 linear gives > 1
        gen = json.loads(run_kiln("generate", out, "--prompt", "The fox", "-n", 6, "--json").stdout)
        assert gen["completion_tokens"] >= 1
    folded = tmp_path / "fold"
    run_kiln("quantize", ws, "-o", folded, "--method", "awq", "--group-size", 32, "--awq-fold-only", *cal)
    ids = token_ids(96, seed=5)
    assert float(np.abs(kiln_logits(folded, ids, tmp_path) - kiln_logits(ws, ids, tmp_path)).max()) < 1e-4

    kv8 = tmp_path / "kv8"
    run_kiln("quantize", ws, "-o", kv8, "--method", "none", "--kv-cache", "int8", "--kv-mode", "online")
    saved = tmp_path / "kv8.safetensors"
    tok = tmp_path / "ids.json"
    tok.write_text(json.dumps(ids))
    rep = json.loads(run_kiln("eval", kv8, "--tokens", tok, "--ctx", len(ids), "--save-logits", saved,
                              "--json").stdout)
    assert rep["kv_cache"] == "int8-online"
    got = load_np(str(saved))["logits"]
    want = cached_logits(family.oracle, ids, int8_online_store)
    diff, unquantized = (float(np.abs(got - x).max()) for x in (want, oracle_logits(family.oracle, ids)))
    print(f"int8 KV: max |logit diff| vs transformers int8 cache {diff:.3g}, vs its fp32 cache {unquantized:.3g}")
    # ~1e-6 with the AVX2 kernels; test_kv_int8.py's bound allows the scalar ISA's last-bit differences. The cache is
    # quantized by that scheme: kiln is far closer to transformers with it than without it (0.007 .. 0.009 away).
    assert diff <= INT8_ORACLE_TOL and diff < unquantized / 3

    assert_serve_matches_generate(ws)




def edited(family, tmp_path, config=None, tensors=None):
    """A copy of the family's safetensors checkpoint with config.json keys replaced and tensors edited."""
    import shutil
    from safetensors.torch import load_file
    src = tmp_path / "src"
    shutil.copytree(family.src, src)
    cfg = {**family.config, **(config or {})}
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    if tensors:
        st = load_file(str(src / "model.safetensors"))
        tensors(st)
        save_file(st, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("name,config,needle", [
    ("internlm", {"rotary": {"base": 10000, "type": "yarn"}}, "'rotary' type \"yarn\" is not supported"),
    ("internlm", {"rotary": {"type": "dynamic"}}, "'rotary' needs a positive 'base'"),
    ("internlm", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "'rope_scaling' is not read by InternLM"),
    ("internlm", {"num_key_value_heads": 2}, "'num_key_value_heads' must equal num_attention_heads"),
    ("internlm", {"rope_theta": 500000.0}, "'rope_theta' contradicts 'rotary'"),
    ("internlm2", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'rope_scaling' type 'llama3'"),
    ("internlm2", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope scaling type 'yarn' is not supported"),
])
def test_unsupported_config_is_refused(name, config, needle, request, tmp_path):
    line = convert_refused(edited(request.getfixturevalue(name), tmp_path, config), tmp_path)
    assert needle in line, line


def test_config_contradicting_tensors_is_refused(internlm, internlm2, tmp_path):
    # wqkv packed for 2 KV heads, config says 4: the row count (4 + 2 * 4) * 16 names the tensor and the keys.
    line = convert_refused(edited(internlm2, tmp_path / "a", {"num_key_value_heads": 4}), tmp_path / "a")
    assert "'model.layers.0.attention.wqkv.weight'" in line and "num_key_value_heads = 4" in line, line
    assert "[192, 64]" in line and "[128, 64]" in line, line
    # InternLM's biases with "bias": false would be dropped silently; refused naming the first one.
    line = convert_refused(edited(internlm, tmp_path / "b", {"bias": False}), tmp_path / "b")
    assert "self_attn." in line and ".bias' is not part of a InternLMForCausalLM" in line, line
    # InternLM2 "bias": true without wqkv.bias.
    line = convert_refused(edited(internlm2, tmp_path / "c", {"bias": True}), tmp_path / "c")
    assert "'model.layers.0.attention.wqkv.bias' is missing" in line, line
    # An AutoAWQ InternLM2 checkpoint (its packed wqkv is not regrouped in int4) is refused before anything is read.
    awq = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                   "version": "gemm"}}
    line = convert_refused(edited(internlm2, tmp_path / "d", awq), tmp_path / "d")
    assert "AutoAWQ checkpoints of InternLM2ForCausalLM are not supported" in line and "wqkv" in line, line


def test_inspect_and_autoawq_export_refusal(internlm2, tmp_path):
    info = json.loads(run_kiln("inspect", internlm2.ws, "--json").stdout)
    assert info["model"]["architecture"] == "InternLM2ForCausalLM" and info["model"]["family"] == "internlm2"
    assert info["model"]["num_kv_heads"] == 2 and info["model"]["rope"]["scaling"] == "dynamic"
    q = tmp_path / "q"
    run_kiln("quantize", internlm2.ws, "-o", q, "--method", "rtn", "--group-size", 32)
    r = run_kiln("export", q, "--format", "autoawq", "-o", tmp_path / "awq", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot be exported as AutoAWQ" in r.stderr and not (tmp_path / "awq").exists()
