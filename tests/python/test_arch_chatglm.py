"""ChatGLM2-6B / ChatGLM3-6B original checkpoints (ChatGLMModel, model_type "chatglm", the remote-code layout) and
their SentencePiece tokenizer, through convert, eval, generate, quantize (RTN, AWQ, INT8 KV) and serve.

Oracles:
- the model: the same weights as transformers' GlmForCausalLM. transformers' convert_glm_weights_to_hf.py maps the
  ChatGLM tensors one to one onto GlmForCausalLM (query_key_value -> q|k|v, dense_h_to_4h -> gate_up_proj, ...); the
  checkpoint here is written by GlmForCausalLM and rewritten into the ChatGLM layout by that mapping in reverse.
  Logits within 1e-3 in fp32, 32 greedy tokens identical.
- the tokenizer: ChatGLM2's own tokenizer code (SPTokenizer and the [gMASK] sop prefix of ChatGLM2Tokenizer, from the
  PyPI package modelscope), over a SentencePiece model trained here with the sentencepiece package.
"""
import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file
from transformers import GlmConfig, GlmForCausalLM

from conftest import REPO, convert_refused, run_kiln, save_sharded_bin
from reference_code import load_modelscope_file
from test_tokenizer import kiln_lines

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
EVAL = REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt"
CORPUS = REPO / "tests" / "data" / "tokenizer_corpus" / "corpus.jsonl"
PADDED_VOCAB = 640
CHINESE = ["你好，请问今天天气怎么样？", "问：什么是机器学习？答：机器学习是人工智能的一个分支。",
           "我们一起去公园散步吧。", "中文和English混合的句子，包括数字123和标点！"]


def chatglm_config(**over):
    """config.json of a tiny ChatGLM2/3 checkpoint: the keys (and defaults) of the real chatglm2-6b / chatglm3-6b."""
    cfg = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
           "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
           "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
           "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
           "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "ffn_hidden_size": 128,
           "fp32_residual_connection": False, "hidden_dropout": 0.0, "hidden_size": 64, "kv_channels": 16,
           "layernorm_epsilon": 1e-05, "multi_query_attention": True, "multi_query_group_num": 2,
           "num_attention_heads": 4, "num_layers": 2, "original_rope": True, "padded_vocab_size": PADDED_VOCAB,
           "post_layer_norm": True, "rmsnorm": True, "seq_length": 512, "quantization_bit": 0, "pre_seq_len": None,
           "prefix_projection": False, "use_cache": True, "torch_dtype": "float32", "tie_word_embeddings": False,
           "eos_token_id": 2, "pad_token_id": 0}
    cfg.update(over)
    return cfg


def chatglm_state_dict(sd, layers):
    """GlmForCausalLM's state dict in ChatGLM's original names (convert_glm_weights_to_hf.py's mapping reversed)."""
    out = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
           "transformer.output_layer.weight": sd["lm_head.weight"],
           "transformer.rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)}
    for i in range(layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        a = p + "self_attn."
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "self_attention.query_key_value.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        out[q + "self_attention.query_key_value.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        out[q + "self_attention.dense.weight"] = sd[a + "o_proj.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "mlp.dense_h_to_4h.weight"] = sd[p + "mlp.gate_up_proj.weight"]
        out[q + "mlp.dense_4h_to_h.weight"] = sd[p + "mlp.down_proj.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def train_sentencepiece(path):
    """A small SentencePiece model configured like ChatGLM's (BPE, byte fallback, no normalization, spaces kept)."""
    lines = CALIB.read_text(encoding="utf-8").splitlines()[:400] + CHINESE * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=600, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
                                   split_digits=True, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())


def write_tokenizer(dst, sp_model):
    (dst / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "name_or_path": "THUDM/chatglm2-6b", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))


@pytest.fixture(scope="module")
def chatglm(tmp_path_factory):
    """{"glm": GlmForCausalLM dir (the oracle), "st": ChatGLM layout in safetensors, "bin": the same as sharded
    torch.save .bin files, "ws": the safetensors one converted, "sp": the tokenizer.model}."""
    root = tmp_path_factory.mktemp("chatglm")
    sp_model = root / "tokenizer.model"
    train_sentencepiece(sp_model)
    torch.manual_seed(0)
    cfg = GlmConfig(vocab_size=PADDED_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                    rms_norm_eps=1e-5, max_position_embeddings=512, initializer_range=0.1, eos_token_id=2,
                    pad_token_id=0)
    model = GlmForCausalLM(cfg).float().eval()
    with torch.no_grad():  # biases are zero at init; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    glm = root / "glm"
    model.save_pretrained(glm)
    sd = chatglm_state_dict(model.state_dict(), 2)

    st, binary = root / "chatglm-st", root / "chatglm-bin"
    for d in (st, binary):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(chatglm_config(), indent=2))
        write_tokenizer(d, sp_model)
    save_file(sd, str(st / "model.safetensors"), metadata={"format": "pt"})
    save_sharded_bin(sd, binary)
    ws = root / "ws"
    run_kiln("convert", st, "-o", ws)
    return {"glm": glm, "st": st, "bin": binary, "ws": ws, "sp": sp_model, "model": model}


def test_inspect_and_bin_checkpoint_converts_identically(chatglm, tmp_path):
    info = json.loads(run_kiln("inspect", chatglm["ws"], "--json").stdout)
    assert info["model"]["architecture"] == "ChatGLMModel" and info["model"]["family"] == "chatglm"
    other = tmp_path / "ws-bin"
    run_kiln("convert", chatglm["bin"], "-o", other)
    weights = sorted(p.name for p in chatglm["ws"].glob("weights-*.safetensors"))
    assert weights and weights == sorted(p.name for p in other.glob("weights-*.safetensors"))
    for name in weights:
        assert (chatglm["ws"] / name).read_bytes() == (other / name).read_bytes()


def test_logits_match_glm_for_causal_lm(chatglm, tmp_path):
    rng = np.random.default_rng(7)
    ids = [int(x) for x in rng.integers(3, PADDED_VOCAB, size=48)]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", chatglm["ws"], "--tokens", tmp_path / "ids.json", "--ctx", len(ids), "--save-logits", out,
             "--kv-cache", "fp32")
    from safetensors.numpy import load_file as load_np
    ours = load_np(str(out))["logits"]
    with torch.no_grad():
        ref = chatglm["model"](torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(ours - ref).max())
    print(f"chatglm: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3


def test_greedy_32_tokens_match(chatglm, tmp_path):
    prompt = [64, 65, 300, 12, 99, 410, 7, 150]
    model = chatglm["model"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    hf = out.sequences[0, len(prompt):].tolist()
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    assert min(margins) > 1e-3, margins  # no step close enough to a tie for fp32 noise to flip
    (tmp_path / "p.json").write_text(json.dumps(prompt))
    res = json.loads(run_kiln("generate", chatglm["ws"], "--tokens", tmp_path / "p.json", "-n", 32, "--kv-cache",
                              "fp32", "--ignore-eos", "--json").stdout)
    assert res["token_ids"] == hf


def reference_tokenizer(sp_model):
    tok = load_modelscope_file("models/nlp/chatglm2/tokenization.py", "chatglm2_tokenization")
    return tok.SPTokenizer(str(sp_model))


def test_tokenizer_matches_chatglm2_reference(chatglm):
    """kiln's ids for ChatGLMTokenizer = [gMASK] sop + SentencePiece ids, as ChatGLM2Tokenizer(text) gives them;
    the command tokens have the reference's ids (SentencePiece vocabulary size + k)."""
    ref = reference_tokenizer(chatglm["sp"])
    prefix = [ref.special_tokens["[gMASK]"], ref.special_tokens["sop"]]
    texts = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").split("\n") if line][:120] + CHINESE
    got = kiln_lines(chatglm["ws"], texts)
    bad = [(t, g["ids"]) for t, g in zip(texts, got) if g["ids"] != prefix + ref.encode(t)]
    assert not bad, bad[:3]
    # The command tokens, where text spells them (as ChatGLM3's tokenizer with encode_special_tokens=True reads them).
    text = "[gMASK]sop<|user|>\n hello<|assistant|>"
    want = [ref.special_tokens["[gMASK]"], ref.special_tokens["sop"], ref.n_words + 1] + ref.encode("\n hello") + [
        ref.n_words + 2]
    assert kiln_lines(chatglm["ws"], [text], "--no-special")[0]["ids"] == want
    ids = ref.encode(CHINESE[3]) + [2]  # </s> decodes to nothing, as in the reference
    decoded = run_kiln("tokenize", chatglm["ws"], "--decode", "--json", "--text", " ".join(map(str, ids)))
    assert json.loads(decoded.stdout)["text"] == ref.decode(ids) == CHINESE[3]


def test_eval_quantize_int8_kv_and_serve(chatglm, tmp_path):
    ws = chatglm["ws"]
    eval_args = ["--text", EVAL, "--ctx", 64, "--max-tokens", 256]
    ref = tmp_path / "ref.safetensors"
    base = json.loads(run_kiln("eval", ws, *eval_args, "--kv-cache", "fp32", "--save-logits", ref, "--json").stdout)
    assert np.isfinite(base["ppl"])
    rtn = json.loads(run_kiln("quantize", ws, "-o", tmp_path / "rtn", "--method", "rtn", "--group-size", 32,
                              "--eval-text", EVAL, "--eval-ctx", 64, "--json").stdout)
    assert rtn["quality"]["kld_mean"] < 0.5, rtn["quality"]
    awq_args = ["--method", "awq", "--group-size", 32, "--data", CALIB, "--samples", 8, "--seqlen", 32, "--seed", 1]
    run_kiln("quantize", ws, "-o", tmp_path / "awq", *awq_args)
    run_kiln("quantize", ws, "-o", tmp_path / "awq2", *awq_args)
    for f in sorted((tmp_path / "awq").glob("weights-*.safetensors")):
        assert f.read_bytes() == (tmp_path / "awq2" / f.name).read_bytes()
    run_kiln("verify", tmp_path / "awq")
    stats = tmp_path / "stats.safetensors"
    run_kiln("calibrate", ws, "--data", CALIB, "--samples", 8, "--seqlen", 64, "-o", stats)
    run_kiln("quantize", ws, "-o", tmp_path / "kv8", "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
             "--kv-stats", stats)
    rep = json.loads(run_kiln("eval", tmp_path / "kv8", *eval_args, "--ref-logits", ref, "--json").stdout)
    assert rep["kv_cache"] == "int8-static" and 0 < rep["kld_mean"] < 1e-3, rep

    from test_serve import assert_serve_matches_generate
    assert_serve_matches_generate(ws)




@pytest.mark.parametrize("key,value", [("rope_ratio", 16), ("rope_ratio", 0), ("multi_query_attention", False),
                                       ("pre_seq_len", 128), ("quantization_bit", 4), ("rmsnorm", False), ("add_bias_linear", True),
                                       ("apply_residual_connection_post_layernorm", True), ("original_rope", False)])
def test_unsupported_variants_are_refused(chatglm, key, value, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(**{key: value})))
    (src / "model.safetensors").write_bytes((chatglm["st"] / "model.safetensors").read_bytes())
    line = convert_refused(src, tmp_path)
    assert f"'{key}'" in line, line


def test_qkv_width_contradicting_config_is_refused(chatglm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(multi_query_group_num=1)))
    (src / "model.safetensors").write_bytes((chatglm["st"] / "model.safetensors").read_bytes())
    line = convert_refused(src, tmp_path)
    assert "query_key_value" in line and "multi_query_group_num = 1" in line, line


@pytest.mark.parametrize("name,ratio,rope", [
    ("THUDM/chatglm2-6b-32k", 16.0, {"rope_type": "linear", "factor": 16.0, "rope_theta": 10000.0}),
    ("THUDM/chatglm3-6b-32k", 50.0, {"rope_type": "default", "rope_theta": 500000.0}),
])
def test_rope_ratio_of_each_generation(chatglm, name, ratio, rope, tmp_path):
    """ChatGLM2-6B-32K's code divides positions by rope_ratio (= linear RoPE scaling); ChatGLM3's multiplies the base
    by it (transformers' GLM conversion: rope_theta = 10000 * rope_ratio). Oracle: GlmForCausalLM so configured,
    with the same weights."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(rope_ratio=ratio, _name_or_path=name)))
    for f in ("model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        (src / f).write_bytes((chatglm["st"] / f).read_bytes())
    cfg = GlmConfig.from_pretrained(chatglm["glm"])
    cfg.rope_parameters = dict(rope, partial_rotary_factor=0.5)
    model = GlmForCausalLM.from_pretrained(chatglm["glm"], config=cfg, dtype=torch.float32).eval()
    ids = [int(x) for x in np.random.default_rng(3).integers(3, PADDED_VOCAB, size=64)]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", src, "--tokens", tmp_path / "ids.json", "--ctx", len(ids), "--save-logits", out,
             "--kv-cache", "fp32")
    from safetensors.numpy import load_file as load_np
    ours = load_np(str(out))["logits"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        plain = chatglm["model"](torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref - plain).max() > 1e-2  # rope_ratio changes the logits
    assert float(np.abs(ours - ref).max()) <= 1e-3
