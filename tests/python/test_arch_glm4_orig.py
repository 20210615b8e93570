"""GLM-4-9B original checkpoints (glm-4-9b / glm-4-9b-chat in the remote-code layout: ChatGLMModel, model_type
"chatglm", the ChatGLM2/3 tensors) and their tiktoken tokenizer (tokenizer.model, ChatGLM4Tokenizer).

Oracles:
- the model: GlmForCausalLM with rope_theta = 10000 * rope_ratio (GLM-4's RotaryEmbedding multiplies the base by
  rope_ratio, as ChatGLM3's does), its weights rewritten into the original layout by test_arch_chatglm's mapping.
  Logits within 1e-3 in fp32, 32 greedy tokens identical.
- the tokenizer: PyPI tiktoken.Encoding with GLM-4's pat_str (tokenization_chatglm.py) and its 14 special tokens
  numbered after the vocabulary, over a tokenizer.model written from GPT-2's byte-level vocabulary. What the test adds
  around it is ChatGLM4Tokenizer's own behaviour: no normalization, the special tokens recognised in text (they are
  added tokens in tokenizer_config.json), and [gMASK] <sop> before every encoded text.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file
from transformers import GlmConfig, GlmForCausalLM

from conftest import convert_refused, run_kiln
from test_arch_chatglm import chatglm_config, chatglm_state_dict
from test_arch_qwen1 import gpt2_ranks, write_tiktoken
from test_tokenizer import CORPUS, kiln_decode_lines, kiln_lines

GLM4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>"]
RANKS = 600  # the tiny model's vocabulary: the first 600 GPT-2 tokens, then GLM-4's specials, padded to 640
PADDED_VOCAB = 640
ROPE_RATIO = 50.0
# The shape of glm-4-9b-chat's chat_template (its tool and metadata branches left out): the template itself starts
# with [gMASK]<sop>, and transformers encodes the rendered prompt without adding special tokens.
CHAT_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def special_ids(n_ranks):
    return {s: n_ranks + i for i, s in enumerate(SPECIALS)}


def encoding(ranks):
    import tiktoken
    return tiktoken.Encoding("glm4-test", pat_str=GLM4_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special_ids(len(ranks)))


def glm4_encode(enc, text, add_special_tokens=True):
    """ChatGLM4Tokenizer(text): the specials (its added tokens) recognised anywhere, the rest through tiktoken with
    GLM-4's regex, no normalization; [gMASK] <sop> first unless add_special_tokens is False."""
    sp = special_ids(enc.n_vocab - len(SPECIALS))
    prefix = [sp["[gMASK]"], sp["<sop>"]] if add_special_tokens else []
    return prefix + enc.encode(text, allowed_special="all")


def write_tokenizer(dst, ranks):
    write_tiktoken(dst / "tokenizer.model", ranks)
    sp = special_ids(len(ranks))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLM4Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "added_tokens_decoder": {str(i): {"content": s, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for s, i in sp.items()},
        "additional_special_tokens": SPECIALS, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "padding_side": "left", "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4")
    torch.manual_seed(1)
    cfg = GlmConfig(vocab_size=PADDED_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                    rms_norm_eps=1.5625e-7, max_position_embeddings=512, initializer_range=0.1,
                    pad_token_id=0, eos_token_id=2)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0 * ROPE_RATIO, "partial_rotary_factor": 0.5}
    model = GlmForCausalLM(cfg).float().eval()
    with torch.no_grad():  # biases are zero at init; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    sp = special_ids(RANKS)
    eos = [sp["<|endoftext|>"], sp["<|user|>"], sp["<|observation|>"]]
    src = root / "glm-4-9b-chat"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(
        _name_or_path="THUDM/glm-4-9b-chat", rope_ratio=ROPE_RATIO, padded_vocab_size=PADDED_VOCAB,
        layernorm_epsilon=1.5625e-7, eos_token_id=eos, pad_token_id=eos[0])))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos[0],
                                                            "do_sample": True, "temperature": 0.8}))
    write_tokenizer(src, gpt2_ranks(RANKS))
    save_file(chatglm_state_dict(model.state_dict(), 2), str(src / "model.safetensors"), metadata={"format": "pt"})
    ws = root / "ws"
    run_kiln("convert", src, "-o", ws)
    return {"src": src, "ws": ws, "model": model, "eos": eos, "enc": encoding(gpt2_ranks(RANKS))}


def test_logits_match_glm_with_base_times_rope_ratio(glm4, tmp_path):
    ids = [int(x) for x in np.random.default_rng(5).integers(3, RANKS, size=64)]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", glm4["ws"], "--tokens", tmp_path / "ids.json", "--ctx", len(ids), "--save-logits", out,
             "--kv-cache", "fp32")
    ours = load_np(str(out))["logits"]
    model = glm4["model"]
    plain_cfg = GlmConfig.from_dict(model.config.to_dict())
    plain_cfg.rope_parameters = dict(model.config.rope_parameters, rope_theta=10000.0)
    plain = GlmForCausalLM(plain_cfg).float().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ref - unscaled).max() > 1e-2  # rope_ratio changes the logits
    diff = float(np.abs(ours - ref).max())
    print(f"glm-4 original: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3


def test_greedy_32_tokens_match(glm4, tmp_path):
    prompt = [64, 65, 300, 12, 99, 410, 7, 150]
    seq, margins = list(prompt), []
    with torch.no_grad():  # plain greedy over the full sequence: no generation_config, no EOS handling
        for _ in range(32):
            last = glm4["model"](torch.tensor([seq])).logits[0, -1]
            margins.append(float(torch.topk(last, 2).values.diff().abs()))
            seq.append(int(torch.argmax(last)))
    hf = seq[len(prompt):]
    assert min(margins) > 1e-3, margins  # no step close enough to a tie for fp32 noise to flip
    (tmp_path / "p.json").write_text(json.dumps(prompt))
    res = json.loads(run_kiln("generate", glm4["ws"], "--tokens", tmp_path / "p.json", "-n", 32, "--kv-cache",
                              "fp32", "--ignore-eos", "--temperature", 0, "--json").stdout)
    assert res["token_ids"] == hf


def test_workspace_keeps_rope_eos_and_chat_template(glm4):
    kiln_json = json.loads((glm4["ws"] / "kiln.json").read_text())
    text = json.dumps(kiln_json)
    assert "500000" in text  # rope_theta = 10000 * rope_ratio
    info = json.loads(run_kiln("inspect", glm4["ws"], "--json").stdout)
    assert info["model"]["family"] == "chatglm"
    assert sorted(info["model"]["eos_token_ids"]) == sorted(glm4["eos"]), info["model"]
    assert (glm4["ws"] / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_prompts_start_with_gmask_sop_once(glm4):
    enc, ws = glm4["enc"], glm4["ws"]
    gen = json.loads(run_kiln("generate", ws, "--prompt", "The fox jumps", "-n", 4, "--temperature", 0,
                              "--json").stdout)
    assert gen["prompt_token_ids"] == glm4_encode(enc, "The fox jumps")
    chat = json.loads(run_kiln("generate", ws, "--prompt", "hi there", "--chat", "-n", 4, "--temperature", 0,
                               "--json").stdout)
    want = glm4_encode(enc, "[gMASK]<sop><|user|>\nhi there<|assistant|>", add_special_tokens=False)
    assert chat["prompt_token_ids"] == want
    gmask = special_ids(RANKS)["[gMASK]"]
    assert chat["prompt_token_ids"].count(gmask) == 1 and chat["prompt_token_ids"][:2] == [gmask, gmask + 2]


@pytest.fixture(scope="module")
def full_vocab(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4-tok")
    ranks = gpt2_ranks()
    write_tokenizer(d, ranks)
    return d, ranks


def test_tokenizer_matches_tiktoken_oracle(full_vocab):
    d, ranks = full_vocab
    enc = encoding(ranks)
    texts = CORPUS + ["[gMASK]<sop><|system|>\nYou are helpful.<|user|>\nhi<|assistant|>\nhello<|endoftext|>",
                      "numbers 1234567 and 12 345 ６７８９, e\u0301 cafe\u0301 \u212b (not NFC-normalized)",
                      "I'M HERE, you'Re 'S 'ſ <|end_of_video|><|begin_of_image|> <eop>[MASK][sMASK]",
                      "tabs\t\tand  \n\n  spaces   "]
    want = [glm4_encode(enc, t) for t in texts]
    got = [g["ids"] for g in kiln_lines(d, texts)]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, bad[:3]
    plain = [g["ids"] for g in kiln_lines(d, texts[-4:], "--no-special")]
    assert plain == [glm4_encode(enc, t, add_special_tokens=False) for t in texts[-4:]]
    dec = kiln_decode_lines(d, want)
    assert [x["text"] for x in dec] == [enc.decode(ids) for ids in want]
    assert sum(i >= len(ranks) for ids in want for i in ids[2:]) >= 11  # the 11 specials spelled in the texts


def test_rope_ratio_without_a_generation_name_is_refused(glm4, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(
        _name_or_path="/data/my-finetune", rope_ratio=ROPE_RATIO, padded_vocab_size=PADDED_VOCAB)))
    (src / "model.safetensors").write_bytes((glm4["src"] / "model.safetensors").read_bytes())
    line = convert_refused(src, tmp_path)
    assert "'rope_ratio'" in line and "glm-4" in line, line
