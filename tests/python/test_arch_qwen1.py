"""Qwen v1 (QWenLMHeadModel, Qwen-7B-Chat) through the toolchain, against Qwen's own model code and tiktoken.

Oracles:
- The reference implementation: the QWenBlock / QWenAttention / QWenMLP / RotaryEmbedding / RMSNorm classes of
  modelscope 1.9.5 (modelscope/models/nlp/qwen/backbone.py), taken from the installed package by name and run
  unchanged (the module's other imports, modelscope's registry and flash-attn, are not needed by these classes). The
  glue around them (embedding lookup, blocks in order, final norm, lm_head, feeding one token at a time with the
  blocks' own KV cache) is QWenModel.forward's and QWenLMHeadModel's, reduced to what runs in fp32 without masks.
  The tiny checkpoint is that module's state dict, so its tensor names are the real ones. Past seq_length this is
  the only oracle of use_logn_attn and use_dynamic_ntk (computed at the first forward and kept while decoding).
- Within seq_length, the same weights as transformers' Qwen2ForCausalLM (q/k/v biases, gate = w2, up = w1).
- Tokenizer: tiktoken.Encoding with Qwen's regex and special tokens (tokenization_qwen.py) over a qwen.tiktoken file
  written from GPT-2's byte-level vocabulary (ranks = GPT-2 ids), on NFC text with every special token allowed.
"""
import ast
import base64
import gzip
import importlib.util
import json
import math
import shutil
import types
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

from conftest import DATA, REPO, convert_refused, run_kiln
from test_tokenizer import CORPUS, kiln_decode_lines, kiln_lines

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SEQ_LENGTH = 32  # logn and NTK start past 32 positions
MODEL_RANKS = 2000  # the model's vocabulary: the first 2000 GPT-2 tokens, then Qwen's specials


# --- the reference implementation --------------------------------------------------------------------------------
def reference_classes():
    """Qwen's model classes from modelscope's backbone.py, compiled on their own."""
    spec = importlib.util.find_spec("modelscope")
    assert spec is not None, "modelscope is not installed (scripts/setup.sh installs it without dependencies)"
    path = Path(spec.origin).parent / "models" / "nlp" / "qwen" / "backbone.py"
    tree = ast.parse(path.read_text())
    wanted = {"QWenAttention", "QWenMLP", "QWenBlock", "RotaryEmbedding", "RMSNorm", "_rotate_half",
              "apply_rotary_pos_emb"}
    body = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in wanted]
    assert {n.name for n in body} == wanted
    ns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math, "importlib": importlib,
          "Optional": object, "Tuple": object, "autocast": None, "rms_norm": None, "flash_attn_unpadded_func": None}
    from typing import Optional, Tuple
    ns.update(Optional=Optional, Tuple=Tuple)
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return types.SimpleNamespace(**{k: ns[k] for k in wanted})


def reference_config(cfg):
    """The attributes modelscope's classes read, from a Qwen-7B-Chat style config.json (its n_* / ffn_hidden_size
    names are the older spelling of the same keys)."""
    return types.SimpleNamespace(
        hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"], seq_length=cfg["seq_length"],
        kv_channels=cfg["kv_channels"], rotary_pct=cfg["rotary_pct"], rotary_emb_base=cfg["rotary_emb_base"],
        use_dynamic_ntk=cfg["use_dynamic_ntk"], use_logn_attn=cfg["use_logn_attn"], no_bias=cfg["no_bias"],
        ffn_hidden_size=cfg["intermediate_size"], layer_norm_epsilon=cfg["layer_norm_epsilon"],
        apply_residual_connection_post_layernorm=False, use_flash_attn=False, bf16=False, fp16=False,
        params_dtype=torch.float32, attn_pdrop=0.0)


class Reference(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        q, rc = reference_classes(), reference_config(cfg)
        self.transformer = torch.nn.Module()
        self.transformer.wte = torch.nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.transformer.h = torch.nn.ModuleList(q.QWenBlock(rc, layer_idx=i) for i in range(cfg["num_hidden_layers"]))
        self.transformer.ln_f = q.RMSNorm(cfg["hidden_size"], eps=cfg["layer_norm_epsilon"])
        self.lm_head = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids, past=None):
        x = self.transformer.wte(torch.tensor([ids]))
        presents = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, layer_past=past[i] if past else None, use_cache=True)
            presents.append(present)
        return self.lm_head(self.transformer.ln_f(x))[0], presents

    @torch.no_grad()
    def greedy(self, prompt, n, margin=1e-3):
        """Greedy continuation (prefill, then one token at a time on the blocks' cache) and the prefix that fp32 noise
        cannot change (steps before the first top-2 margin below `margin`)."""
        logits, past = self(prompt)
        out, safe = [], None
        for _ in range(n):
            top = torch.topk(logits[-1], 2).values
            if safe is None and float(top[0] - top[1]) < margin:
                safe = len(out)
            out.append(int(torch.argmax(logits[-1])))
            logits, past = self([out[-1]], past)
        return out, n if safe is None else safe


def qwen_config(**kw):
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": 2304, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16, "intermediate_size": 192,
           "max_position_embeddings": 256, "seq_length": SEQ_LENGTH, "layer_norm_epsilon": 1e-6,
           "rotary_pct": 1.0, "rotary_emb_base": 10000, "use_dynamic_ntk": True, "use_logn_attn": True,
           "no_bias": True, "tie_word_embeddings": False, "scale_attn_weights": True, "bf16": False, "fp16": False,
           "fp32": False, "use_flash_attn": "auto", "initializer_range": 0.02}
    cfg.update(kw)
    return cfg


def make_reference(cfg, seed=0):
    torch.manual_seed(seed)
    model = Reference(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "ln" in name else 0.4 if "lm_head" in name else 0.08)
                     + (1.0 if "ln" in name else 0.0))
    return model


# --- tokenizer files -----------------------------------------------------------------------------------------------
def gpt2_ranks(limit=None):
    """GPT-2's byte-level vocabulary as tiktoken ranks (bytes -> id), the first `limit` ids."""
    with gzip.open(DATA / "tokenizers" / "gpt2" / "tokenizer.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_of = {chr(c): b for b, c in zip(bs, cs)}
    ranks = {bytes(byte_of[ch] for ch in tok): i for tok, i in vocab.items() if limit is None or i < limit}
    assert sorted(ranks.values()) == list(range(len(ranks)))
    return ranks


def write_tiktoken(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                       key=lambda e: e[1])))


def tiktoken_encoding(ranks):
    import tiktoken
    special = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def qwen_encode(enc, text):
    """What tokenization_qwen.py's QWenTokenizer gives: NFC, then tiktoken with every special token allowed."""
    return enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# --- fixtures ------------------------------------------------------------------------------------------------------
def write_checkpoint(dst, cfg, model, fmt="safetensors"):
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "eos_token_id": MODEL_RANKS}))
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer", "chat_template": CHATML}))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, dst / "pytorch_model.bin")
    write_tiktoken(dst / "qwen.tiktoken", gpt2_ranks(MODEL_RANKS))
    return dst


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen1")
    cfg = qwen_config()
    model = make_reference(cfg)
    src = write_checkpoint(root / "hf", cfg, model)
    ws = root / "ws"
    run_kiln("convert", src, "-o", ws, "--dtype", "fp32")
    return types.SimpleNamespace(root=root, cfg=cfg, model=model, src=src, ws=ws)


def token_ids(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(3, MODEL_RANKS, size=n)]


def kiln_logits(ws, ids, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(ids))
    out = tmp_path / "l.safetensors"
    run_kiln("eval", ws, "--tokens", tmp_path / "t.json", "--ctx", len(ids), "--save-logits", out, "--kv-cache", "fp32")
    return load_np(str(out))["logits"]


# --- model parity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [24, 100])
def test_logits_match_reference(qwen, n, tmp_path):
    """Within seq_length (24) and past it (100: logn scaling from position 32, NTK alpha 7)."""
    ids = token_ids(n, seed=n)
    with torch.no_grad():
        want = qwen.model(ids)[0].numpy()
    got = kiln_logits(qwen.ws, ids, tmp_path)
    diff = float(np.abs(got - want).max())  # printed for the record
    print(f"n={n}: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3
    if n > SEQ_LENGTH:  # the test can fail: without Qwen's two tricks the reference gives other logits
        for flag in ("use_logn_attn", "use_dynamic_ntk"):
            plain = make_reference(qwen_config(**{flag: False}))
            with torch.no_grad():
                other = plain(ids)[0].numpy()
            assert np.abs(other - want).max() > 1e-2, flag


def test_biases_of_no_bias_false_match_reference(tmp_path):
    """no_bias: false gives c_proj and the MLP biases (w2's and w1's go into gate_up's bias in that order)."""
    cfg = qwen_config(no_bias=False, num_hidden_layers=1)
    model = make_reference(cfg, seed=3)
    src = write_checkpoint(tmp_path / "hf", cfg, model)
    run_kiln("convert", src, "-o", tmp_path / "ws", "--dtype", "fp32")
    ids = token_ids(48, seed=4)
    with torch.no_grad():
        want = model(ids)[0].numpy()
    assert np.abs(kiln_logits(tmp_path / "ws", ids, tmp_path) - want).max() <= 1e-3


def test_logits_match_transformers_qwen2_within_seq_length(qwen, tmp_path):
    """A second, independent oracle while logn and NTK are inactive: Qwen2ForCausalLM with the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg, sd = qwen.cfg, qwen.model.state_dict()
    q2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=cfg["intermediate_size"] // 2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=False)).float().eval()
    m, H = {}, 64
    m["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
    m["model.norm.weight"] = sd["transformer.ln_f.weight"]
    m["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(2):
        h, p = f"transformer.h.{i}.", f"model.layers.{i}."
        for j, x in enumerate("qkv"):
            m[p + f"self_attn.{x}_proj.weight"] = sd[h + "attn.c_attn.weight"][j * H:(j + 1) * H]
            m[p + f"self_attn.{x}_proj.bias"] = sd[h + "attn.c_attn.bias"][j * H:(j + 1) * H]
        m[p + "self_attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"]
        m[p + "input_layernorm.weight"] = sd[h + "ln_1.weight"]
        m[p + "post_attention_layernorm.weight"] = sd[h + "ln_2.weight"]
        m[p + "mlp.gate_proj.weight"] = sd[h + "mlp.w2.weight"]
        m[p + "mlp.up_proj.weight"] = sd[h + "mlp.w1.weight"]
        m[p + "mlp.down_proj.weight"] = sd[h + "mlp.c_proj.weight"]
    q2.load_state_dict(m, strict=True)
    ids = token_ids(SEQ_LENGTH, seed=7)
    with torch.no_grad():
        want = q2(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(kiln_logits(qwen.ws, ids, tmp_path) - want).max() <= 1e-3


@pytest.mark.parametrize("n_prompt,seed,chunk", [(20, 1020, 512), (40, 2002, 512), (40, 2002, 16)])
def test_greedy_matches_reference(qwen, n_prompt, seed, chunk, tmp_path):
    """32 greedy tokens. Prompt 20: decoding crosses seq_length (logn starts, NTK stays at the prompt's alpha 1).
    Prompt 40: alpha 3 from the prompt is kept while decoding passes 64 positions (where a length-following NTK
    would switch to 7), also with the prompt fed in chunks of 16."""
    prompt = token_ids(n_prompt, seed=seed)
    want, safe = qwen.model.greedy(prompt, 32)
    (tmp_path / "p.json").write_text(json.dumps(prompt))
    res = json.loads(run_kiln("generate", qwen.ws, "--tokens", tmp_path / "p.json", "-n", 32, "--kv-cache", "fp32",
                              "--prefill-chunk", chunk, "--json").stdout)
    got = res["token_ids"]
    print(f"prompt {n_prompt}: reference {want}, margin-safe prefix {safe}")
    assert safe >= 16, "margins too thin to compare"
    assert got[:safe] == want[:safe]


# --- checkpoints and refusals --------------------------------------------------------------------------------------
def test_first_release_config_spelling_matches_reference(tmp_path):
    """Qwen's first release spelled hidden_size / num_hidden_layers / num_attention_heads / max_position_embeddings /
    intermediate_size as n_embd / n_layer / n_head / n_positions / ffn_hidden_size, and its code defaulted to
    layer_norm_epsilon 1e-5 without logn attention or dynamic NTK. Such a config (defaults left out) gives the
    reference model of those settings, past seq_length too."""
    cfg = qwen_config(layer_norm_epsilon=1e-5, use_logn_attn=False, use_dynamic_ntk=False)
    model = make_reference(cfg, seed=5)
    old = {k: v for k, v in cfg.items() if k not in ("layer_norm_epsilon", "use_logn_attn", "use_dynamic_ntk")}
    for new_key, old_key in (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                             ("num_attention_heads", "n_head"), ("max_position_embeddings", "n_positions"),
                             ("intermediate_size", "ffn_hidden_size")):
        old[old_key] = old.pop(new_key)
    src = write_checkpoint(tmp_path / "hf", old, model)
    run_kiln("convert", src, "-o", tmp_path / "ws", "--dtype", "fp32")
    ids = token_ids(100, seed=6)
    with torch.no_grad():
        want = model(ids)[0].numpy()
    assert np.abs(kiln_logits(tmp_path / "ws", ids, tmp_path) - want).max() <= 1e-3
    # Both spellings of one key at once are refused, not guessed.
    (src / "config.json").write_text(json.dumps({**old, "hidden_size": 64}))
    line = convert_refused(src, tmp_path)
    assert "n_embd" in line and "hidden_size" in line, line


def test_bin_checkpoint_converts_like_safetensors(qwen, tmp_path):
    src = write_checkpoint(tmp_path / "bin", qwen.cfg, qwen.model, fmt="bin")
    run_kiln("convert", src, "-o", tmp_path / "ws", "--dtype", "fp32")
    files = json.loads((qwen.ws / "kiln.json").read_text())["weights"]["files"]
    for f in files:
        assert (tmp_path / "ws" / f).read_bytes() == (qwen.ws / f).read_bytes()




@pytest.mark.parametrize("change,needle", [
    ({"intermediate_size": 256}, "transformer.h.0.mlp.w2.weight"),
    ({"hidden_size": 48}, "hidden_size"),
    ({"kv_channels": 8}, "kv_channels"),
    ({"seq_length": None}, "seq_length"),
    ({"intermediate_size": 191}, "intermediate_size"),
    ({"rotary_pct": 0.0}, "rotary_pct"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ({"no_bias": False}, "transformer.h.0.attn.c_proj.bias"),
])
def test_config_contradictions_are_refused(qwen, change, needle, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(qwen.src, src)
    cfg = dict(qwen.cfg)
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))
    line = convert_refused(src, tmp_path)
    assert needle in line, line


def test_workspace_records_logn_and_ntk(qwen):
    doc = json.loads((qwen.ws / "kiln.json").read_text())
    model = doc["model"]
    assert model["logn_attn_length"] == SEQ_LENGTH and doc["format_version"] == 2
    assert model["rope"]["scaling"] == "qwen_dynamic"
    assert model["rope"]["original_max_position_embeddings"] == SEQ_LENGTH
    assert model["intermediate_size"] == qwen.cfg["intermediate_size"] // 2


# --- tokenizer -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiktoken")
    ranks = gpt2_ranks()
    write_tiktoken(d / "qwen.tiktoken", ranks)
    return d, ranks


def test_tokenizer_matches_tiktoken(full_vocab):
    d, ranks = full_vocab
    enc = tiktoken_encoding(ranks)
    texts = CORPUS + ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|extra_7|>there"
                      "<|im_end|>\n<|endoftext|>", "e\u0301 cafe\u0301 \u212b <|extra_204|><|extra_205|>",
                      "I'M HERE, you'Re 'S 'ſ 12345 ６７", "tabs\t\tand  \n\n  spaces   "]
    want = [qwen_encode(enc, t) for t in texts]
    got = [g["ids"] for g in kiln_lines(d / "qwen.tiktoken", texts)]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, bad[:3]
    dec = kiln_decode_lines(d, want)
    assert [x["text"] for x in dec] == [enc.decode(ids) for ids in want]
    specials = [i for ids in want for i in ids if i >= len(ranks)]
    assert specials  # the special tokens were recognised and kept their ids


@pytest.mark.parametrize("content,needle", [
    ("QUJD 0\nnot-base64! 1\n", "line 2"),
    ("QUJD 0\nQUJD 1\n", "appears twice"),  # the same token twice
    ("QUJD 0\nQUI= 2\n", "rank 1"),  # a gap in the ranks
    ("QUJD x\n", "rank 'x'"),
    ("QQ== 0\n", "single byte"),  # only "A": the other bytes are missing
])
def test_malformed_tiktoken_is_refused(content, needle, tmp_path):
    (tmp_path / "qwen.tiktoken").write_text(content)
    r = run_kiln("tokenize", tmp_path, "--text", "hi", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "qwen.tiktoken" in r.stderr and needle in r.stderr, r.stderr


# --- the rest of the toolchain -------------------------------------------------------------------------------------
def test_generate_chat_eval_quantize_and_serve(qwen, tmp_path):
    """Text in and out through the tiktoken tokenizer; RTN and AWQ; static INT8 KV; serve answering the openai
    client with what `kiln generate` gives."""
    ws = qwen.ws
    enc = tiktoken_encoding(gpt2_ranks(MODEL_RANKS))
    gen = json.loads(run_kiln("generate", ws, "--prompt", "The fox jumps", "-n", 8, "--temperature", 0,
                              "--json").stdout)
    assert gen["prompt_token_ids"] == qwen_encode(enc, "The fox jumps")
    assert gen["text"] == enc.decode([t for t in gen["token_ids"] if t < MODEL_RANKS])
    chat = json.loads(run_kiln("generate", ws, "--prompt", "hi", "--chat", "-n", 4, "--json").stdout)
    assert chat["prompt_token_ids"] == qwen_encode(enc, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ev = tmp_path / "eval.txt"
    ev.write_text(EVAL.read_text(encoding="utf-8")[:2000], encoding="utf-8")
    stats, ref, q = tmp_path / "stats.safetensors", tmp_path / "ref.safetensors", tmp_path / "kv8"
    base = json.loads(run_kiln("eval", ws, "--text", ev, "--ctx", 64, "--kv-cache", "fp32", "--save-logits", ref,
                               "--json").stdout)
    assert np.isfinite(base["ppl"])
    assert load_np(str(ref))["tokens"].tolist() == qwen_encode(enc, ev.read_text(encoding="utf-8"))
    cal = ("--data", CALIB, "--samples", 8, "--seqlen", 48, "--seed", 1)
    for method, extra in (("rtn", ()), ("awq", cal)):
        r = json.loads(run_kiln("quantize", ws, "-o", tmp_path / method, "--method", method, "--group-size", 32,
                                "--eval-text", ev, "--eval-ctx", 64, "--json", *extra).stdout)
        run_kiln("verify", tmp_path / method)
        print(method, r["quality"])
        assert r["quality"]["kld_mean"] < 0.5, (method, r["quality"])
    run_kiln("calibrate", ws, *cal[:6], "-o", stats)
    run_kiln("quantize", ws, "-o", q, "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
             "--kv-stats", stats)
    rep = json.loads(run_kiln("eval", q, "--text", ev, "--ctx", 64, "--ref-logits", ref, "--json").stdout)
    print("int8-static KV", rep)
    assert rep["kv_cache"] == "int8-static" and 0 < rep["kld_mean"] < 1e-2, rep
    from test_serve import assert_serve_matches_generate
    assert_serve_matches_generate(ws)


def test_prefix_caches_keep_ntk_alphas_apart(qwen, tmp_path):
    """Qwen fixes the NTK alpha from the prompt length, so K/V that serve cached for a 40-token prompt (alpha 3) must
    not be reused by a 30-token prompt sharing its first block (alpha 1: with those keys its 6th token would differ
    from the reference's), while a longer prompt with the same alpha reuses them."""
    from test_serve import Server
    p1 = token_ids(40, seed=5)
    p2, p3 = p1[:30], p1 + token_ids(8, seed=6)

    def fresh(p):  # a fresh cache (equal to the reference: test_greedy_matches_reference)
        (tmp_path / "p.json").write_text(json.dumps(p))
        return json.loads(run_kiln("generate", qwen.ws, "--tokens", tmp_path / "p.json", "-n", 8, "--temperature", 0,
                                   "--json").stdout)["text"]

    server = Server(qwen.ws)
    try:
        client = server.client()

        def ask(p):
            return client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text

        def hits():
            m = server.metrics()
            return m.get("kiln_prefix_cache_hit_tokens_total", m.get("kiln_prefix_cache_hit_tokens"))

        assert ask(p1) == fresh(p1)
        before = hits()
        assert ask(p2) == fresh(p2)
        assert hits() == before
        assert ask(p3) == fresh(p3)
        assert hits() > before
    finally:
        server.stop()


def test_chat_session_drops_kv_when_the_ntk_alpha_changes(qwen, tmp_path):
    """kiln chat keeps the conversation's K/V across turns; when the conversation grows past seq_length Qwen's NTK
    alpha changes, so the next turn must be computed as from scratch (as `kiln generate --messages` does, which
    equals the reference), and reuse must resume once the alpha stays."""
    from test_chat import stats
    common = ("--ctx", 256, "-n", 6, "--temperature", 0)
    users = ["Hi", "And the sea?", "Then?"]
    proc = run_kiln("chat", qwen.ws, *common, input="".join(u + "\n" for u in users))
    messages, want = [], ""
    for u in users:
        messages.append({"role": "user", "content": u})
        (tmp_path / "m.json").write_text(json.dumps(messages))
        answer = json.loads(run_kiln("generate", qwen.ws, "--messages", tmp_path / "m.json", *common,
                                     "--json").stdout)
        assert answer["prompt_tokens"] <= SEQ_LENGTH if len(messages) == 1 else answer["prompt_tokens"] > SEQ_LENGTH
        messages.append({"role": "assistant", "content": answer["text"]})
        want += answer["text"] + "\n"
    assert proc.stdout == want
    reused = [int(line.split(" reused")[0].rsplit(" ", 1)[1]) for line in stats(proc.stderr)]
    assert reused[1] == 0 and reused[2] > SEQ_LENGTH, (reused, proc.stderr)
