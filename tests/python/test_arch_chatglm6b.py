"""ChatGLM-6B (v1: ChatGLMForConditionalGeneration with inner_hidden_size / position_encoding_2d) through convert,
eval and generate, and its ice_text.model tokenizer, against its own model and tokenizer code.

Oracle for the tokenizer: modelscope 1.9.5's ChatGLMTokenizer (models/nlp/chatglm/tokenization.py: SPTokenizer's
newline / tab / blank rewriting and num_image_tokens shift, the class's special tokens, build_inputs_with_special_tokens
appending [gMASK] <sop>), run as tokenize -> convert_tokens_to_ids -> build_inputs_with_special_tokens (its _pad does
not take transformers 5's padding_side, so __call__ cannot run), over a SentencePiece model trained here with the
command and whitespace pieces as user-defined symbols, as ice_text.model has them.

Oracle for the model: the GLMBlock / SelfAttention / GLU / RotaryEmbedding / attention_fn / rotate_half /
apply_rotary_pos_emb_index / gelu classes and functions of modelscope 1.9.5 (modelscope/models/nlp/chatglm/
text_generation.py), taken from the installed package by name and run unchanged but for @torch.jit.script, which
compiles the same ops and would recompile for every new length (the module's own imports pull in modelscope's hub
client; these pieces need only torch), together with ChatGLMPreTrainedModel.get_masks and
get_position_ids, also taken unchanged, which define the prefix-LM mask (tokens before <sop> see each other both
ways) and the 2D position ids ([gMASK]'s position and 1, 2, ... from <sop> on). The glue is ChatGLMModel.forward's
(embedding, blocks with their layer ids, final LayerNorm, lm_head). The checkpoint is that module's state dict, so
its tensor names are the real ones. Each greedy step recomputes the whole sequence, which is what the reference's
cached decoding computes (generated tokens are causal).
"""
import ast
import importlib.util
import io
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

from conftest import REPO, convert_refused, run_kiln, save_sharded_bin
from reference_code import load_modelscope_file
from test_tokenizer import CORPUS, kiln_decode_lines, kiln_lines

# ids as the tokenizer below gives them: num_image_tokens 20, then <unk> <s> </s> and the user-defined pieces
NUM_IMAGE_TOKENS = 20
VOCAB, END, PAD, MASK, GMASK, SOP, EOP = 640, 22, 23, 24, 25, 28, 29
LAYERS = 2
CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
CHINESE = ["你好，请问今天天气怎么样？", "问：什么是机器学习？\n答：机器学习是人工智能的一个分支。"]
PIECES = (["<pad>", "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<n>", "<|tab|>"] +
          [f"<|blank_{i}|>" for i in range(2, 81)])


# THUDM/chatglm-6b's tokenizer_config.json keys, with this vocabulary's num_image_tokens.
TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
    "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
    "remove_space": False, "do_lower_case": False, "num_image_tokens": NUM_IMAGE_TOKENS,
    "tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


def train_ice_text(path):
    lines = CALIB.read_text(encoding="utf-8").splitlines()[:400] + CHINESE * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=600,
                                   model_type="unigram", user_defined_symbols=PIECES, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2)
    path.write_bytes(buf.getvalue())


def reference_tokenizer(model_file):
    """ChatGLMTokenizer with the keyword arguments from_pretrained passes it from tokenizer_config.json."""
    tok = load_modelscope_file("models/nlp/chatglm/tokenization.py", "chatglm_tokenization")
    kwargs = {k: v for k, v in TOKENIZER_CONFIG.items() if k not in ("name_or_path", "tokenizer_class", "auto_map")}
    return tok.ChatGLMTokenizer(vocab_file=str(model_file), **kwargs)


def reference_ids(tok, text):
    return tok.build_inputs_with_special_tokens(tok.convert_tokens_to_ids(tok.tokenize(text)))


def write_tokenizer(dst, model_file):
    (dst / "ice_text.model").write_bytes(model_file.read_bytes())
    (dst / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))


def reference_namespace():
    spec = importlib.util.find_spec("modelscope")
    assert spec is not None, "modelscope is not installed (scripts/setup.sh installs it without dependencies)"
    path = Path(spec.origin).parent / "models" / "nlp" / "chatglm" / "text_generation.py"
    tree = ast.parse(path.read_text())
    wanted = {"gelu_impl", "gelu", "RotaryEmbedding", "rotate_half", "apply_rotary_pos_emb_index", "attention_fn",
              "SelfAttention", "GLU", "GLMBlock"}
    body = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in wanted]
    assert {n.name for n in body} == wanted
    for n in body:  # @torch.jit.script compiles the same ops, once per new sequence length (0.3 s each)
        if isinstance(n, ast.FunctionDef):
            n.decorator_list = []
    pre = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChatGLMPreTrainedModel")
    methods = [n for n in pre.body if isinstance(n, ast.FunctionDef) and n.name in ("get_masks", "get_position_ids")]
    assert len(methods) == 2
    from typing import Optional, Tuple
    ns = {"__name__": "chatglm6b_reference", "torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math, "LayerNorm": torch.nn.LayerNorm,
          "skip_init": torch.nn.utils.skip_init, "Optional": Optional, "Tuple": Tuple}
    exec(compile(ast.Module(body=body + methods, type_ignores=[]), str(path), "exec"), ns)
    return ns


class Reference(torch.nn.Module):
    """ChatGLMForConditionalGeneration's modules under their names, and ChatGLMModel.forward without a cache."""

    def __init__(self, ns, cfg):
        super().__init__()
        self.ns, self.config = ns, types.SimpleNamespace(**cfg)
        self.position_encoding_2d = True
        self.transformer = torch.nn.Module()
        t = self.transformer
        t.word_embeddings = torch.nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        t.layers = torch.nn.ModuleList([ns["GLMBlock"](
            cfg["hidden_size"], cfg["num_attention_heads"], cfg["layernorm_epsilon"], i,
            inner_hidden_size=cfg["inner_hidden_size"],
            hidden_size_per_attention_head=cfg["hidden_size"] // cfg["num_attention_heads"],
            layernorm=torch.nn.LayerNorm, use_bias=True, params_dtype=torch.float, num_layers=cfg["num_layers"],
            position_encoding_2d=True) for i in range(cfg["num_layers"])])
        t.final_layernorm = torch.nn.LayerNorm(cfg["hidden_size"], eps=cfg["layernorm_epsilon"])
        self.lm_head = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, input_ids, presents=None):
        """Logits [batch, seq, vocab]; with a list `presents`, each layer's (K after RoPE, V) [seq, batch, heads, dim]
        is appended to it."""
        get_masks = self.ns["get_masks"].__get__(self)
        get_position_ids = self.ns["get_position_ids"].__get__(self)
        mask_token = GMASK if GMASK in input_ids else MASK
        mask_positions = [seq.tolist().index(mask_token) for seq in input_ids]
        attention_mask = get_masks(input_ids, device=input_ids.device)
        position_ids = get_position_ids(input_ids, mask_positions=mask_positions, device=input_ids.device,
                                        gmask=GMASK in input_ids)
        h = self.transformer.word_embeddings(input_ids).transpose(0, 1)
        for i, layer in enumerate(self.transformer.layers):
            out = layer(h, position_ids=position_ids, attention_mask=attention_mask, layer_id=torch.tensor(i),
                        use_cache=presents is not None)
            h = out[0]
            if presents is not None:
                presents.append(out[1])
        h = self.transformer.final_layernorm(h)
        return self.lm_head(h).permute(1, 0, 2).contiguous()


def chatglm6b_config(**over):
    """config.json of a tiny ChatGLM-6B checkpoint: the keys (and the defaults) of THUDM/chatglm-6b."""
    cfg = {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
           "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
           "bos_token_id": SOP, "eos_token_id": EOP, "mask_token_id": MASK, "gmask_token_id": GMASK,
           "pad_token_id": PAD, "hidden_size": 64, "inner_hidden_size": 256, "layernorm_epsilon": 1e-05,
           "max_sequence_length": 256, "num_attention_heads": 4, "num_layers": LAYERS, "position_encoding_2d": True,
           "torch_dtype": "float32", "use_cache": True, "vocab_size": VOCAB}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference runs tiny tensors, where torch's thread handoffs on a busy 2-core machine cost 100x the math."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def glm6b(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatglm6b")
    sp_model = root / "ice_text.model"
    train_ice_text(sp_model)
    ref_tok = reference_tokenizer(sp_model)
    assert [ref_tok.convert_tokens_to_ids(t) for t in ("</s>", "<pad>", "[MASK]", "[gMASK]", "<sop>", "<eop>")] == [
        END, PAD, MASK, GMASK, SOP, EOP]
    assert NUM_IMAGE_TOKENS + ref_tok.sp_tokenizer.num_text_tokens <= VOCAB
    ns = reference_namespace()
    torch.manual_seed(0)
    model = Reference(ns, chatglm6b_config())
    with torch.no_grad():  # skip_init leaves the linears uninitialized
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1 if p.dim() == 2 else 0.05)
    model = model.float().eval()
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    st, binary = root / "st", root / "bin"
    for d in (st, binary):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(chatglm6b_config(), indent=2))
        write_tokenizer(d, sp_model)
    save_file(sd, str(st / "model.safetensors"), metadata={"format": "pt"})
    save_sharded_bin(sd, binary)  # as THUDM/chatglm-6b ships it
    ws = root / "ws"
    run_kiln("convert", st, "-o", ws)
    return {"model": model, "st": st, "bin": binary, "ws": ws, "tok": ref_tok}


def prompt(n=12, seed=7):
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(31, 600, size=n)] + [GMASK, SOP]


def test_inspect_and_bin_converts_identically(glm6b, tmp_path):
    info = json.loads(run_kiln("inspect", glm6b["ws"], "--json").stdout)
    assert info["model"]["family"] == "chatglm_v1", info["model"]
    other = tmp_path / "ws-bin"
    run_kiln("convert", glm6b["bin"], "-o", other)
    weights = sorted(p.name for p in glm6b["ws"].glob("weights-*.safetensors"))
    assert weights and weights == sorted(p.name for p in other.glob("weights-*.safetensors"))
    for name in weights:
        assert (glm6b["ws"] / name).read_bytes() == (other / name).read_bytes()


def test_logits_match_reference(glm6b, tmp_path):
    """A prompt (context, [gMASK], <sop>) and 6 continuation tokens in one forward: the context rows attend both
    ways, the rest causally, under 2D positions."""
    ids = prompt() + [17, 230, 5, 99, 410, 7]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "logits.safetensors"
    run_kiln("eval", glm6b["ws"], "--tokens", tmp_path / "ids.json", "--ctx", len(ids), "--save-logits", out,
             "--kv-cache", "fp32")
    ours = load_np(str(out))["logits"]
    with torch.no_grad():
        ref = glm6b["model"](torch.tensor([ids]))[0].numpy()
    assert ours.shape[0] in (len(ids), len(ids) - 1)
    diff = float(np.abs(ours - ref[: ours.shape[0]]).max())
    print(f"chatglm-6b: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3
    # The prefix is bidirectional: a context row's logits depend on later context tokens.
    with torch.no_grad():
        changed = glm6b["model"](torch.tensor([ids[:5] + [ids[5] + 1] + ids[6:]]))[0].numpy()
    assert np.abs(changed[2] - ref[2]).max() > 1e-3


def test_greedy_32_tokens_match(glm6b, tmp_path):
    ids = prompt(10, seed=3)
    model, seq, margins = glm6b["model"], list(ids), []
    with torch.no_grad():
        for _ in range(32):
            logits = model(torch.tensor([seq]))[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(torch.argmax(logits)))
    assert min(margins) > 1e-3, margins
    (tmp_path / "p.json").write_text(json.dumps(ids))
    res = json.loads(run_kiln("generate", glm6b["ws"], "--tokens", tmp_path / "p.json", "-n", 32, "--kv-cache",
                              "fp32", "--ignore-eos", "--json").stdout)
    assert res["token_ids"] == seq[len(ids):]


def test_prompt_without_sop_is_refused(glm6b, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(prompt()[:-1]))
    r = run_kiln("generate", glm6b["ws"], "--tokens", tmp_path / "p.json", "-n", 4, check=False)
    assert r.returncode == 1 and "<sop>" in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.parametrize("key,value", [("position_encoding_2d", False), ("pre_seq_len", 8), ("quantization_bit", 4)])
def test_unsupported_variants_are_refused(glm6b, key, value, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm6b_config(**{key: value})))
    (src / "model.safetensors").write_bytes((glm6b["st"] / "model.safetensors").read_bytes())
    line = convert_refused(src, tmp_path)
    assert f"'{key}'" in line, line


def test_tokenizer_matches_reference(glm6b):
    """Text ids + [gMASK] <sop>, whitespace spelled as pieces, every id shifted by num_image_tokens; the class's
    special tokens split the text (each part with its own dummy prefix) and [MASK] in the text replaces [gMASK] with
    </s>."""
    tok = glm6b["tok"]
    texts = CORPUS[:120] + CHINESE + ["code:\n\tif x:\n        return  1\n" + " " * 85 + "end", "a [MASK] b",
                                      "x [gMASK] y <sop> z</s>w <eop>", "[sMASK] stays a piece", "<unk> and <pad>", "  lead\n\n"]
    got = kiln_lines(glm6b["ws"], texts)
    bad = [(t, g["ids"], reference_ids(tok, t)) for t, g in zip(texts, got) if g["ids"] != reference_ids(tok, t)]
    assert not bad, bad[:3]
    ids = tok.sp_tokenizer.encode(texts[-5]) + [5] + tok.sp_tokenizer.encode(CHINESE[1])  # 5: an image token
    decoded = kiln_decode_lines(glm6b["ws"], [ids, ids[:-3]])
    assert [d["text"] for d in decoded] == [tok.sp_tokenizer.decode(ids), tok.sp_tokenizer.decode(ids[:-3])]
    assert tok.sp_tokenizer.decode(tok.sp_tokenizer.encode(texts[-5])) == texts[-5]


def reference_chat_prompt(tok, query, history):
    """The prompt ChatGLMForConditionalGeneration._chat builds (its code run unchanged, with the model's generate
    replaced by a stop): the ids its tokenizer call makes of that prompt."""
    spec = importlib.util.find_spec("modelscope")
    path = Path(spec.origin).parent / "models" / "nlp" / "chatglm" / "text_generation.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChatGLMForConditionalGeneration")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_chat")
    fn.decorator_list = []
    ns = {"LogitsProcessorList": list, "InvalidScoreLogitsProcessor": lambda: None, "List": list, "Tuple": tuple}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)

    class Seen(Exception):
        pass

    def tokenizer(prompts, return_tensors):
        raise Seen(prompts[0])

    try:
        ns["_chat"](None, tokenizer, query, history)
    except Seen as e:
        return e.args[0]
    raise AssertionError("_chat did not call its tokenizer")


SYSTEM = "You are a careful assistant. 回答要简洁。"


def test_builtin_chat_template_matches_chat(glm6b, tmp_path):
    """convert picks the built-in "chatglm" template (the checkpoint ships none); it renders what _chat builds, and
    the ids are the reference tokenizer's of that prompt (with its [gMASK] <sop>)."""
    info = json.loads(run_kiln("inspect", glm6b["ws"], "--json").stdout)
    assert "chatglm" in json.dumps(info), info
    tok = glm6b["tok"]
    cases = [([], "你好"), ([("What is the capital of France?", "Paris."), ("再见", "好的")], "你好，请问今天天气怎么样？")]
    for history, query in cases:
        msgs = []
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": query})
        (tmp_path / "m.json").write_text(json.dumps(msgs))
        got = run_kiln("prompt", glm6b["ws"], "--messages", tmp_path / "m.json").stdout
        ref = reference_chat_prompt(tok, query, history)
        assert got == ref + "[gMASK]<sop>", (got, ref)
        assert kiln_lines(glm6b["ws"], [got], "--no-special")[0]["ids"] == reference_ids(tok, ref)
    assert ref == ("[Round 0]\n问：What is the capital of France?\n答：Paris.\n[Round 1]\n问：再见\n答：好的\n"
                   "[Round 2]\n问：你好，请问今天天气怎么样？\n答：")
    # No system role in ChatGLM-6B: kiln puts the system message first, then a newline.
    (tmp_path / "m.json").write_text(json.dumps([{"role": "system", "content": SYSTEM}] + msgs))
    got = run_kiln("prompt", glm6b["ws"], "--messages", tmp_path / "m.json").stdout
    assert got == SYSTEM + "\n" + ref + "[gMASK]<sop>"


def test_quantize_int8_kv_and_serve(glm6b, tmp_path):
    """RTN int4 and INT8 KV (online scales) run; serve equals generate, also when its token budget is smaller than the prompt's context (the first chunk
    holds the whole bidirectional context) and with the prefix cache on (disabled for prefix LMs)."""
    ws = glm6b["ws"]
    ids = prompt(40, seed=5) + [17, 230, 5, 99]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    ev = ["--tokens", tmp_path / "ids.json", "--ctx", len(ids)]
    ref = tmp_path / "ref.safetensors"
    run_kiln("eval", ws, *ev, "--kv-cache", "fp32", "--save-logits", ref)
    rep = json.loads(run_kiln("eval", ws, *ev, "--kv-cache", "int8", "--ref-logits", ref, "--json").stdout)
    assert 0 < rep["kld_mean"] < 1e-2, rep
    run_kiln("quantize", ws, "-o", tmp_path / "rtn", "--method", "rtn", "--group-size", 32)
    rep = json.loads(run_kiln("eval", tmp_path / "rtn", *ev, "--ref-logits", ref, "--json").stdout)
    assert rep["kld_mean"] < 0.5, rep

    # bench offline: its synthetic prompts end with [gMASK] <sop> for a prefix LM, so none fails.
    bench = json.loads(run_kiln("bench", "offline", ws, "--num-prompts", 3, "--input-len", 12, "--output-len", 4,
                                "--id-range", 500, "--json").stdout)
    assert all(r["failed"] == 0 and r["requests"] == 3 for r in bench["runs"]), bench

    from test_serve import Server, generate
    text = "The devil is in the details, " * 4
    want = generate(ws, text, 12, "--ignore-eos")
    # the reference's greedy tokens for the same prompt ids
    seq = reference_ids(glm6b["tok"], text)
    assert want["prompt_tokens"] == len(seq)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(torch.argmax(glm6b["model"](torch.tensor([seq]))[0, -1])))
    assert want["token_ids"] == seq[-12:]
    server = Server(ws, "--max-batch-tokens", 8)  # the prompt's context is 3x that
    try:
        for _ in range(2):  # the second time a prefix cache would hold this prompt
            status, body, _ = server.request("POST", "/v1/completions", {
                "model": "tiny", "prompt": text, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            assert status == 200 and json.loads(body)["choices"][0]["text"] == want["text"], body
        # Chat completions render the built-in template: the prompt is _chat's, closed by [gMASK] <sop>.
        history = [("What is the capital of France?", "Paris.")]
        msgs = [{"role": "user", "content": history[0][0]}, {"role": "assistant", "content": history[0][1]},
                {"role": "user", "content": "你好"}]
        status, body, _ = server.request("POST", "/v1/chat/completions", {
            "model": "tiny", "messages": msgs, "max_tokens": 4, "temperature": 0})
        ref_prompt = reference_ids(glm6b["tok"], reference_chat_prompt(glm6b["tok"], "你好", history))
        assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == len(ref_prompt), body
        # A prompt without <sop> is refused with 400; the server stays up.
        status, body, _ = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": [31, 32, 33],
                                                                     "max_tokens": 2})
        assert status == 400 and "<sop>" in body, body
        assert server.get("/health")[0] == 200
    finally:
        server.stop()


def test_eval_text_windows_follow_an_empty_prompt(glm6b, tmp_path):
    """eval --text: each window of the text (encoded without the tokenizer's closing [gMASK] <sop>) runs after a
    [gMASK] <sop> prompt, as the reference model's continuation of an empty context; the logits of every window row
    equal the reference's for [gMASK] <sop> + window."""
    text = tmp_path / "t.txt"
    text.write_text(CALIB.read_text(encoding="utf-8")[:600], encoding="utf-8")
    out = tmp_path / "logits.safetensors"
    rep = json.loads(run_kiln("eval", glm6b["ws"], "--text", text, "--ctx", 24, "--max-tokens", 60, "--kv-cache",
                              "fp32", "--save-logits", out, "--json").stdout)
    saved = load_np(str(out))
    tok = glm6b["tok"]
    ids = tok.convert_tokens_to_ids(tok.tokenize(text.read_text(encoding="utf-8")))[:60]
    assert saved["tokens"].tolist() == ids
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, 60, 24):
            w = ids[begin:begin + 24]
            ref = glm6b["model"](torch.tensor([[GMASK, SOP] + w]))[0, 2:]
            assert float(np.abs(saved["logits"][begin:begin + len(w)] - ref.numpy()).max()) <= 1e-3
            logp = torch.log_softmax(ref.double(), -1)
            nll -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
            count += len(w) - 1
    assert rep["n_tokens"] == count and abs(rep["ppl"] - math.exp(nll / count)) < 1e-3 * rep["ppl"]


def reference_calibration(model, blocks):
    """The reference's statistics of kiln calibrate's blocks, each laid out as kiln runs a prefix LM's block: its
    first half as the bidirectional context, [gMASK] <sop>, its second half as the continuation."""
    inputs, kv, hooks = {}, {}, []
    for i, layer in enumerate(model.transformer.layers):
        for name, mod in (("attn.qkv", layer.attention.query_key_value), ("attn.o", layer.attention.dense),
                          ("ffn.up", layer.mlp.dense_h_to_4h), ("ffn.down", layer.mlp.dense_4h_to_h)):
            def hook(_m, args, key=f"layers.{i}.{name}.input"):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double().numpy())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in blocks:
            presents = []
            model(torch.tensor([b[: len(b) // 2] + [GMASK, SOP] + b[len(b) // 2:]]), presents)
            for i, (k, v) in enumerate(presents):
                for which, t in (("k", k), ("v", v)):
                    kv.setdefault(f"layers.{i}.kv.{which}", []).append(t.double().numpy())
    for h in hooks:
        h.remove()
    ref = {}
    for key, xs in inputs.items():
        x = np.concatenate(xs)
        ref[key + ".abs_mean"], ref[key + ".abs_max"], ref[key + ".sq_mean"] = (
            np.abs(x).mean(0), np.abs(x).max(0), (x * x).mean(0))
    for key, ts in kv.items():  # [seq, batch, heads, dim] -> per head
        t = np.concatenate(ts)
        ref[key + "_min"], ref[key + "_max"], ref[key + "_abs_max"] = (
            t.min(axis=(0, 1, 3)), t.max(axis=(0, 1, 3)), np.abs(t).max(axis=(0, 1, 3)))
    return ref


def test_calibration_awq_and_static_kv(glm6b, tmp_path):
    """kiln calibrate's statistics equal the reference's on the same blocks (linear inputs and K/V after the 2D RoPE,
    context rows bidirectional); AWQ smooths only v -> o (the norms feed the residual, so no norm takes scales) and
    clips: its fold alone is exact, and it ends closer to fp32 than RTN (quantize's own report agrees with eval);
    static INT8 KV scales from the statistics."""
    ws = glm6b["ws"]
    stats_path = tmp_path / "stats.safetensors"
    cal = ["--data", CALIB, "--samples", 4, "--seqlen", 32]
    run_kiln("calibrate", ws, *cal, "--batch-tokens", 70, "-o", stats_path)  # two batches of two blocks
    stats = load_np(str(stats_path))
    ref = reference_calibration(glm6b["model"], stats["calib.tokens"].tolist())
    assert len(ref) == LAYERS * (4 * 3 + 6)
    for key, want in ref.items():
        got = stats[key]
        assert got.shape == want.shape, key
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), key

    text = tmp_path / "eval.txt"
    text.write_text((REPO / "tests" / "data" / "text" / "devils_dictionary_eval.txt").read_text(encoding="utf-8")[:4000],
                    encoding="utf-8")
    ev = ["--text", text, "--ctx", 64, "--max-tokens", 384]
    ref_logits = tmp_path / "ref.safetensors"
    run_kiln("eval", ws, *ev, "--kv-cache", "fp32", "--save-logits", ref_logits)

    def kld(q, *args):
        return json.loads(run_kiln("eval", q, *ev, "--ref-logits", ref_logits, *args, "--json").stdout)["kld_mean"]

    awq = ["--method", "awq", "--group-size", 32, *cal]
    run_kiln("quantize", ws, "-o", tmp_path / "fold", *awq, "--awq-fold-only")
    quality = json.loads(run_kiln("quantize", ws, "-o", tmp_path / "awq", *awq, "--eval-text", text, "--eval-ctx", 64,
                                  "--eval-tokens", 384, "--json").stdout)["quality"]
    run_kiln("quantize", ws, "-o", tmp_path / "rtn", "--method", "rtn", "--group-size", 32)
    doc = json.loads((tmp_path / "awq" / "kiln.json").read_text())["quantization"]["weights"]["awq"]
    assert all(a["attn_norm->qkv"] is None and a["ffn_norm->gate_up"] is None and a["v->o"] is not None
               and a["up->down"] is None for a in doc["alpha"]), doc["alpha"]
    assert kld(tmp_path / "fold", "--kv-cache", "fp32") < 1e-9
    k_awq, k_rtn = kld(tmp_path / "awq", "--kv-cache", "fp32"), kld(tmp_path / "rtn", "--kv-cache", "fp32")
    print(f"chatglm-6b g32 KLD: awq {k_awq:.4g}, rtn {k_rtn:.4g}")
    # quantize's streamed report runs eval's windows ([gMASK] <sop> + window) layer by layer
    assert quality["kld_mean"] == pytest.approx(k_awq, rel=1e-3), quality
    assert k_awq < 0.9 * k_rtn, (k_awq, k_rtn)

    run_kiln("quantize", ws, "-o", tmp_path / "kv8", "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
             "--kv-stats", stats_path)
    assert kld(tmp_path / "kv8") < 1e-2
