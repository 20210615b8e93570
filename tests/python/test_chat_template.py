"""kiln prompt against transformers' apply_chat_template, byte for byte, on real-world chat templates.

Each template gets a tokenizer directory (a real tokenizer.json plus a tokenizer_config.json holding the template and
its special tokens). transformers loads that directory and renders every conversation; kiln renders the same
conversations from the same directory in one --batch invocation per template. Where transformers raises, kiln must
report an error too.
"""
import copy
import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA, run_kiln

transformers = pytest.importorskip("transformers")

TEMPLATES = DATA / "chat_templates"

LLAMA = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
CHATML = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
GEMMA = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
DEEPSEEK = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
GRANITE = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}

# name -> (template file, special tokens); (None, DIR) uses the real tokenizer directory DIR of tests/data/tokenizers,
# with its own tokenizer_config.json and chat template.
TEMPLATE_SPECS = {
    "llama2": ("llama2.jinja", LLAMA),
    "llama3": ("llama3.jinja", LLAMA3),
    "llama3.1": ("llama3.1.jinja", LLAMA3),
    "mistral_instruct": ("mistral_instruct.jinja", LLAMA),
    "mistral_v3_tools": ("mistral_v3_tools.jinja", LLAMA),
    "chatml": ("chatml.jinja", CHATML),
    "qwen2.5": ("qwen2.5.jinja", CHATML),
    "qwen3": (None, "qwen3"),
    "deepseek_v3_real": (None, "deepseek_v3"),
    "phi3_real": (None, "phi3"),
    "gemma4_real": (None, "gemma4"),
    "gemma": ("gemma.jinja", GEMMA),
    "phi3": ("phi3.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}),
    "smollm2": ("smollm2.jinja", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}),
    "zephyr": ("zephyr.jinja", LLAMA),
    "deepseek_v3": ("deepseek_v3.jinja", DEEPSEEK),
    "hermes2_pro": ("hermes2_pro_tool_use.jinja", CHATML),
    "granite_like": ("granite_like.jinja", GRANITE),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
                "days": {"type": "integer", "description": "Forecast days"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web. Returns <html> & \"quotes\".",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "  The query  "},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags"},
                "filters": {"type": "object", "additionalProperties": {"type": "number"}, "description": "Filters"},
                "mode": {"type": ["string", "null"], "description": "Mode"},
                "limit": {"type": "number", "description": "Max results", "default": 1.5},
            },
            "required": ["query"],
        },
        "return": {"type": "string", "description": "The results"},
    },
}
TOOLS = [WEATHER, SEARCH]

UNICODE = "Grüße 👋 — 中文テキスト, \u00a0nbsp, tab\there,\nnew line\n\nand emoji 🧪🔥 ﬁ"
SPECIAL = "{{ bos_token }} {% if x %}{% endif %} {# not a comment #} <|im_end|> \\n \\ ' \" </think> [INST]"


def _call(call_id, name, args, as_string=False):
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def conversations():
    """(label, input) pairs; input is what kiln prompt reads: {"messages": ..., "tools": ..., extra kwargs}."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    s = lambda c: {"role": "system", "content": c}  # noqa: E731
    cases = {
        "single": [u("Hello!")],
        "system": [s("You are a pirate."), u("Hi there")],
        "multi": [u("What is 2+2?"), a("4"), u("And 3+3?")],
        "system_multi": [s("Be brief."), u("one"), a("two"), u("three"), a("four")],
        "ends_assistant": [u("Say hi"), a("Hi!")],
        "unicode": [s(UNICODE), u(UNICODE), a(UNICODE), u("ok?")],
        "special": [u(SPECIAL), a(SPECIAL), u(SPECIAL)],
        "padded": [s("  spaced system  \n"), u("\n  padded user  \n\n"), a("  padded answer "), u(" x ")],
        "empty_content": [u(""), a(""), u("")],
        "not_alternating": [u("a"), u("b")],
        "assistant_first": [a("I start"), u("ok")],
        "think": [u("q1"), a("<think>\nreasoning here\n</think>\n\nanswer one"), u("q2")],
        "reasoning_field": [u("q1"), {"role": "assistant", "content": "answer", "reasoning_content": "because"},
                            u("q2"), {"role": "assistant", "content": "final", "reasoning_content": "r2"}],
        "none_values": [u("hi"), {"role": "assistant", "content": "hey", "tool_calls": None, "name": None}, u("again")],
        "extra_keys": [{"role": "user", "content": "hi", "name": "bob", "weight": 1.0}],
        "multimodal_text": [u("Describe"), a("A cat."), u("Thanks")],
    }
    out = [(k, {"messages": v}) for k, v in cases.items()]
    tool_turns = [
        u("What's the weather in Paris and Zürich?"),
        {"role": "assistant", "content": "", "tool_calls": [
            _call("call00001", "get_weather", {"city": "Paris", "unit": "celsius"}),
            _call("call00002", "get_weather", {"city": "Zürich", "days": 3})]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temp\": 21.5}"},
        {"role": "tool", "tool_call_id": "call00002", "name": "get_weather", "content": "18 °C, windy"},
        a("Paris is 21.5 °C; Zürich 18 °C."),
        u("Thanks! Search for 'jinja' please."),
    ]
    single_call = [
        s("You can call tools."),
        u("Weather in Oslo?"),
        {"role": "assistant", "content": None,
         "tool_calls": [_call("abcdefghi", "get_weather", {"city": "Oslo", "nested": {"a": [1, 2.5, True, None]}})]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"},
    ]
    string_args = [u("Search"), {"role": "assistant", "tool_calls": [
        _call("zyxwvutsr", "search", {"query": "kiln \"quoted\"", "tags": ["a", "b"]}, as_string=True)]},
        {"role": "tool", "tool_call_id": "zyxwvutsr", "content": "results"}]
    out += [
        ("tools_only", {"messages": [u("Hi")], "tools": TOOLS}),
        ("tools_system", {"messages": [s("Sys prompt."), u("Weather?")], "tools": [WEATHER]}),
        ("tool_calls", {"messages": tool_turns, "tools": TOOLS}),
        ("tool_calls_no_tools", {"messages": tool_turns}),
        ("single_call", {"messages": single_call, "tools": [WEATHER]}),
        ("string_args", {"messages": string_args, "tools": [SEARCH]}),
        ("enable_thinking_false", {"messages": [u("Hi")], "enable_thinking": False}),
        ("enable_thinking_true", {"messages": [u("Hi"), a("<think>x</think>y"), u("z")], "enable_thinking": True}),
        ("documents", {"messages": [u("Summarise")], "documents": [
            {"title": " Doc A ", "text": "Alpha text."}, {"content": "Beta text. ünï"}]}),
        ("documents_tools", {"messages": [u("Use both")], "tools": [WEATHER], "documents": [{"text": "x"}]}),
        ("llama31_builtin", {"messages": [s("sys"), u("Search the web")], "builtin_tools": ["brave_search", "wolfram_alpha"],
                             "tools": [WEATHER], "date_string": "01 Jan 2025"}),
        ("llama31_system_tools", {"messages": [u("hi")], "tools": TOOLS, "tools_in_user_message": False}),
        ("custom_kwarg", {"messages": [u("hi")], "controls": {"length": "short"}, "bos_token": "<override>"}),
    ]
    return out


def _template_dir(root: Path, name: str, real_tokenizers: Path) -> Path:
    file, special = TEMPLATE_SPECS[name]
    if file is None:
        return real_tokenizers / special
    d = root / name
    d.mkdir()
    shutil.copy(real_tokenizers / "llama2" / "tokenizer.json", d / "tokenizer.json")
    cfg = {"chat_template": (TEMPLATES / file).read_text(encoding="utf-8"), **special}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return d


def oracle(tokenizer, case, add_generation_prompt):
    case = copy.deepcopy(case)
    messages = case.pop("messages")
    tools = case.pop("tools", None)
    documents = case.pop("documents", None)
    try:
        return {"prompt": tokenizer.apply_chat_template(messages, tools=tools, documents=documents, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt, **case)}
    except Exception as e:  # noqa: BLE001 - any failure must be an error in kiln too
        return {"error": f"{type(e).__name__}: {e}"}


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, real_tokenizers):
    root = tmp_path_factory.mktemp("chat_templates")
    return {name: _template_dir(root, name, real_tokenizers) for name in TEMPLATE_SPECS}


@pytest.mark.parametrize("name", list(TEMPLATE_SPECS))
def test_matches_transformers(name, template_dirs, tmp_path, kiln_bin):
    from transformers import AutoTokenizer

    directory = template_dirs[name]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    inputs, expected, labels = [], [], []
    for label, case in conversations():
        for gen in (True, False):
            inputs.append({**case, "add_generation_prompt": gen})
            expected.append(oracle(tokenizer, case, gen))
            labels.append(f"{label} (add_generation_prompt={gen})")
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps(inputs, ensure_ascii=False), encoding="utf-8")
    got = json.loads(run_kiln("prompt", directory, "--messages", batch, "--batch").stdout)
    assert len(got) == len(expected)
    rendered = 0
    for label, want, have in zip(labels, expected, got):
        if "error" in want:
            assert "error" in have, f"{name} / {label}: transformers failed ({want['error']}) but kiln rendered"
        else:
            assert "prompt" in have, f"{name} / {label}: kiln failed: {have.get('error')}"
            assert have["prompt"] == want["prompt"], f"{name} / {label}"
            rendered += 1
    # Tool-only templates (hermes2_pro iterates `tools`) fail on conversations without tools, as in transformers.
    assert rendered >= 8, f"{name}: too few conversations rendered to be a meaningful check"


@pytest.mark.parametrize("name", ["qwen3", "llama3.1", "chatml"])
def test_single_invocation_prints_exact_bytes(name, template_dirs, tmp_path, kiln_bin):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(template_dirs[name]))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": UNICODE}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(messages), encoding="utf-8")
    for flags, gen in (((), True), (("--no-generation-prompt",), False)):
        proc = run_kiln("prompt", template_dirs[name], "--messages", path, *flags)
        assert proc.stdout == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_accepts_config_file_path(template_dirs, tmp_path, kiln_bin):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "enable_thinking": False}))
    via_dir = run_kiln("prompt", template_dirs["qwen3"], "--messages", path).stdout
    via_file = run_kiln("prompt", template_dirs["qwen3"] / "tokenizer_config.json", "--messages", path).stdout
    assert via_dir == via_file
    assert via_dir.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_no_chat_template_is_a_clear_error(real_tokenizers, tmp_path, kiln_bin):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    proc = run_kiln("prompt", real_tokenizers / "llama2", "--messages", path, check=False)
    assert proc.returncode != 0
    assert "no chat template" in proc.stderr
    assert proc.stdout == ""


def test_raise_exception_message_reaches_the_user(template_dirs, tmp_path, kiln_bin):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]))
    proc = run_kiln("prompt", template_dirs["gemma"], "--messages", path, check=False)
    assert proc.returncode == 1
    assert "System role not supported" in proc.stderr
    assert "line 1" in proc.stderr
