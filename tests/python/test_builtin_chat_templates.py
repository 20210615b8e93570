"""Built-in chat templates for checkpoints whose family builds its prompt in Python (ChatGLM2, ChatGLM3,
Qwen-7B-Chat, internlm-chat v1), picked at convert time from config.json, and --chat-template on convert, prompt,
chat, generate and serve.

Oracles: the family's own prompt-building code where a package ships it (modelscope 1.9.5: ChatGLM2's build_prompt
and tokenizer, Qwen's make_context with chat()'s default system message); otherwise the published format, written
out in the test (ChatGLM3's build_chat_input, as token ids; internlm-chat's "<|User|>:...<eoa>" format). Each test
shows the rendered string of a multi-turn conversation with a system message.
"""
import json
import subprocess

import pytest
import torch

from safetensors.torch import load_file, save_file

from conftest import kiln_binary, run_kiln
from reference_code import load_modelscope_file
from test_arch_chatglm import chatglm, chatglm_config, train_sentencepiece, write_tokenizer  # noqa: F401 (fixture)
from test_tokenizer import kiln_lines

SYSTEM = "You are a careful assistant. 回答要简洁。"
TURNS = [("What is the capital of France?", "Paris."), ("你好，请问今天天气怎么样？", None)]


def conversation(system=SYSTEM):
    msgs = [{"role": "system", "content": system}] if system else []
    for user, answer in TURNS:
        msgs.append({"role": "user", "content": user})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
    return msgs


def history_and_query():
    return [(u, a) for u, a in TURNS if a is not None], TURNS[-1][0]


def prompt(path, messages, tmp_path, *args):
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(messages))
    return run_kiln("prompt", path, "--messages", f, *args).stdout


@pytest.fixture(scope="module")
def glm_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm-tokenizer")
    train_sentencepiece(d / "src.model")
    write_tokenizer(d, d / "src.model")
    (d / "src.model").unlink()
    tok = load_modelscope_file("models/nlp/chatglm2/tokenization.py", "chatglm2_tokenization")
    return d, tok.SPTokenizer(str(d / "tokenizer.model")), tok.ChatGLM2Tokenizer.build_prompt


def test_chatglm2_matches_build_prompt(glm_tokenizer, tmp_path):
    d, sp, build_prompt = glm_tokenizer
    history, query = history_and_query()
    ref = build_prompt(None, query, history)  # ChatGLM2Tokenizer.build_prompt uses nothing of self
    got = prompt(d, conversation(None), tmp_path, "--chat-template", "chatglm2")
    assert got == "[gMASK]sop" + ref == ("[gMASK]sop[Round 1]\n\n问：What is the capital of France?\n\n答：Paris.\n\n"
                                         "[Round 2]\n\n问：你好，请问今天天气怎么样？\n\n答：")
    # The ids the model sees: the tokenizer's [gMASK] sop prefix, then the prompt, as ChatGLM2Tokenizer([prompt]).
    ids = kiln_lines(d, [got], "--no-special")[0]["ids"]
    assert ids == [sp.special_tokens["[gMASK]"], sp.special_tokens["sop"]] + sp.encode(ref)
    # ChatGLM2 has no system role: the system text goes first, followed by a blank line (FastChat's chatglm2 format).
    with_system = prompt(d, conversation(), tmp_path, "--chat-template", "chatglm2")
    assert with_system == "[gMASK]sop" + SYSTEM + "\n\n" + ref


def chatglm3_ids(sp, messages):
    """ChatGLM3's build_chat_input (published in its tokenization_chatglm.py), as ids: [gMASK] sop, then per message
    its role token + encode(metadata + "\\n") + encode(content) with empty metadata, then <|assistant|>. The role
    tokens follow ChatGLM2's five command tokens."""
    role = {r: sp.n_words + k for k, r in enumerate(["system", "user", "assistant", "observation"])}
    ids = [sp.special_tokens["[gMASK]"], sp.special_tokens["sop"]]
    for m in messages:
        ids += [role[m["role"]]] + sp.encode("\n") + sp.encode(m["content"])
    return ids + [role["assistant"]]


def test_chatglm3_matches_build_chat_input(glm_tokenizer, tmp_path):
    d, sp, _ = glm_tokenizer
    got = prompt(d, conversation(), tmp_path, "--chat-template", "chatglm3")
    assert got == ("[gMASK]sop<|system|>\n You are a careful assistant. 回答要简洁。<|user|>\n What is the capital of "
                   "France?<|assistant|>\n Paris.<|user|>\n 你好，请问今天天气怎么样？<|assistant|>")
    assert kiln_lines(d, [got], "--no-special")[0]["ids"] == chatglm3_ids(sp, conversation())
    # An empty message is its role token and encode("\n") only.
    empty = [{"role": "user", "content": ""}]
    assert kiln_lines(d, [prompt(d, empty, tmp_path, "--chat-template", "chatglm3")], "--no-special")[0]["ids"] == \
        chatglm3_ids(sp, empty)


class _NoTokenizer:
    """make_context also builds token ids; only its raw_text is compared here (Qwen's tiktoken tokenizer is not part
    of this test)."""
    im_start_id = im_end_id = 0

    def encode(self, text, **kwargs):
        return []


def config_dir(tmp_path, config):
    """A directory with only config.json and an empty tokenizer_config.json: what the built-in is keyed on."""
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text("{}")
    return d


def test_qwen_matches_make_context(tmp_path):
    utils = load_modelscope_file("models/nlp/qwen/qwen_generation_utils.py", "qwen_generation_utils")
    history, query = history_and_query()
    d = config_dir(tmp_path, {"architectures": ["QWenLMHeadModel"], "model_type": "qwen"})
    got = prompt(d, conversation(), tmp_path)
    ref, _ = utils.make_context(_NoTokenizer(), query, history, system=SYSTEM)
    assert got == ref == ("<|im_start|>system\nYou are a careful assistant. 回答要简洁。<|im_end|>\n<|im_start|>user\n"
                          "What is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
                          "<|im_start|>user\n你好，请问今天天气怎么样？<|im_end|>\n<|im_start|>assistant\n")
    # Without a system message, chat()'s default (modelscope/models/nlp/qwen/text_generation.py) is used.
    ref_default, _ = utils.make_context(_NoTokenizer(), query, history, system="You are a helpful assistant.")
    assert prompt(d, conversation(None), tmp_path, "--chat-template", "qwen") == ref_default


def test_internlm_chat_published_format(tmp_path):
    d = config_dir(tmp_path, {"architectures": ["InternLMForCausalLM"], "model_type": "internlm"})
    # internlm-chat-7b's build_inputs: "<s>", "<|System|>:{meta_instruction}\n", then "<|User|>:{q}\n<|Bot|>:{a}<eoa>\n"
    # per turn, ending with "<|User|>:{query}\n<|Bot|>:".
    want = ("<s><|System|>:You are a careful assistant. 回答要简洁。\n<|User|>:What is the capital of France?\n"
            "<|Bot|>:Paris.<eoa>\n<|User|>:你好，请问今天天气怎么样？\n<|Bot|>:")
    assert prompt(d, conversation(), tmp_path) == want
    assert prompt(d, conversation(None), tmp_path, "--chat-template", "internlm") == "<s>" + want[want.index("<|User"):]


def test_roles_a_family_lacks_are_refused(glm_tokenizer, tmp_path):
    d = glm_tokenizer[0]
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "tool", "content": "x"}]))
    for name in ("chatglm2", "chatglm3", "qwen", "internlm"):
        r = run_kiln("prompt", d, "--messages", f, "--chat-template", name, check=False)
        assert r.returncode == 1 and "tool" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def convert_with(src_cfg, chatglm, tmp_path, *args, name="ws"):
    src = tmp_path / f"src-{name}"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(src_cfg))
    for f in ("model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        (src / f).write_bytes((chatglm["st"] / f).read_bytes())
    ws = tmp_path / name
    run_kiln("convert", src, "-o", ws, *args)
    return src, ws


def inspected(path):
    return json.loads(run_kiln("inspect", path, "--json").stdout)["chat_template"]


def test_convert_picks_the_builtin_and_takes_chat_template(chatglm, tmp_path):
    src, ws = convert_with(chatglm_config(_name_or_path="THUDM/chatglm3-6b"), chatglm, tmp_path)
    assert inspected(src) == inspected(ws) == "builtin:chatglm3"
    assert "builtin:chatglm3" in run_kiln("inspect", ws).stdout
    msgs = conversation()
    assert prompt(ws, msgs, tmp_path) == prompt(ws, msgs, tmp_path, "--chat-template", "chatglm3")
    _, ws2 = convert_with(chatglm_config(_name_or_path="THUDM/chatglm2-6b"), chatglm, tmp_path, name="ws2")
    assert inspected(ws2) == "builtin:chatglm2"
    # Unknown generation: no template; generate --chat says how to give one.
    _, bare = convert_with(chatglm_config(), chatglm, tmp_path, name="bare")
    assert inspected(bare) is None and not (bare / "chat_template.jinja").exists()
    r = run_kiln("generate", bare, "--chat", "--prompt", "hi", "-n", 2, check=False)
    assert r.returncode == 1 and "--chat-template" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # --chat-template FILE is stored verbatim.
    tpl = tmp_path / "mine.jinja"
    tpl.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    _, own = convert_with(chatglm_config(), chatglm, tmp_path, "--chat-template", tpl, name="own")
    assert inspected(own) == "file" and (own / "chat_template.jinja").read_text() == tpl.read_text()
    # A bad value fails before anything is written.
    r = run_kiln("convert", chatglm["st"], "-o", tmp_path / "bad", "--chat-template", "nonesuch", check=False)
    assert r.returncode == 1 and "nonesuch" in r.stderr and "chatglm3" in r.stderr and not (tmp_path / "bad").exists()


def test_checkpoint_template_wins_over_the_builtin(chatglm, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(chatglm_config(_name_or_path="THUDM/chatglm3-6b")))
    for f in ("model.safetensors", "tokenizer.model"):
        (src / f).write_bytes((chatglm["st"] / f).read_bytes())
    cfg = json.loads((chatglm["st"] / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    run_kiln("convert", src, "-o", tmp_path / "ws")
    assert inspected(src) == inspected(tmp_path / "ws") == "checkpoint"
    # ChatGLM3's chat() stops at <|user|> and <|observation|> whatever the template.
    n_words = json.loads(run_kiln("tokenize", src, "--json", "--text", "<|system|>").stdout)["ids"][-1]
    eos = json.loads((tmp_path / "ws" / "kiln.json").read_text())["model"]["eos_token_ids"]
    assert eos == [2, n_words + 1, n_words + 3]


def test_generate_chat_and_serve_take_chat_template(chatglm, tmp_path):
    """The same conversation through generate --messages, chat and serve, each with --chat-template chatglm3: the
    same tokens as generate on the ids build_chat_input gives."""
    ws = chatglm["ws"]  # converted without a template (its config has no _name_or_path)
    sp = load_modelscope_file("models/nlp/chatglm2/tokenization.py", "chatglm2_tokenization").SPTokenizer(
        str(chatglm["sp"]))
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about the fox."}]
    (tmp_path / "ids.json").write_text(json.dumps(chatglm3_ids(sp, msgs)))
    (tmp_path / "m.json").write_text(json.dumps(msgs))
    common = ["-n", 8, "--temperature", 0, "--ignore-eos", "--json"]
    want = json.loads(run_kiln("generate", ws, "--tokens", tmp_path / "ids.json", *common).stdout)
    got = json.loads(run_kiln("generate", ws, "--messages", tmp_path / "m.json", "--chat-template", "chatglm3",
                              *common).stdout)
    assert got["token_ids"] == want["token_ids"] and got["prompt_tokens"] == want["prompt_tokens"]

    proc = subprocess.run([str(kiln_binary()), "chat", str(ws), "--chat-template", "chatglm3", "--system", SYSTEM,
                           "-n", "8", "--temperature", "0", "--ignore-eos"],
                          input="Tell me about the fox.\n".encode(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode() == want["text"] + "\n"

    from test_serve import Server
    server = Server(ws, "--chat-template", "chatglm3")
    try:
        r = server.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want["text"]
    finally:
        server.stop()


def test_builtin_turn_end_tokens_stop_generation(chatglm, tmp_path):
    """ChatGLM3's chat() stops at <|user|> and <|observation|> as well as at EOS: a checkpoint config.json names as
    ChatGLM3 gets those ids in its EOS set, in the workspace and when run from the HF directory. The head is rigged
    so that every step picks <|user|> or token 5 (sign of one hidden unit), so <|user|> comes up within a few steps."""
    sp = load_modelscope_file("models/nlp/chatglm2/tokenization.py", "chatglm2_tokenization").SPTokenizer(
        str(chatglm["sp"]))
    user, observation = sp.n_words + 1, sp.n_words + 3
    src, ws = convert_with(chatglm_config(_name_or_path="THUDM/chatglm3-6b"), chatglm, tmp_path)
    eos = json.loads((ws / "kiln.json").read_text())["model"]["eos_token_ids"]
    assert eos == [2, user, observation]
    _, ws2 = convert_with(chatglm_config(_name_or_path="THUDM/chatglm2-6b"), chatglm, tmp_path, name="ws2")
    assert json.loads((ws2 / "kiln.json").read_text())["model"]["eos_token_ids"] == [2]

    sd = load_file(str(src / "model.safetensors"))
    norm = torch.zeros_like(sd["transformer.encoder.final_layernorm.weight"])
    norm[0] = 1.0
    head = torch.zeros_like(sd["transformer.output_layer.weight"])
    head[user, 0], head[5, 0] = 10.0, -10.0
    sd["transformer.encoder.final_layernorm.weight"], sd["transformer.output_layer.weight"] = norm, head
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "p.json").write_text(json.dumps([64, 65, 300, 12]))
    args = ["--tokens", tmp_path / "p.json", "-n", 32, "--temperature", 0, "--json"]
    from_dir = json.loads(run_kiln("generate", src, *args).stdout)
    assert from_dir["finish_reason"] == "stop" and from_dir["token_ids"][-1] == user, from_dir
    assert len(from_dir["token_ids"]) < 32
    run_kiln("convert", src, "-o", tmp_path / "rigged")
    assert json.loads(run_kiln("generate", tmp_path / "rigged", *args).stdout)["token_ids"] == from_dir["token_ids"]
    ignoring = json.loads(run_kiln("generate", src, *args, "--ignore-eos").stdout)["token_ids"]
    assert len(ignoring) == 32 and ignoring[:len(from_dir["token_ids"])] == from_dir["token_ids"]
