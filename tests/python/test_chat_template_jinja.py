"""kiln's Jinja interpreter against transformers' jinja2 environment, one small template at a time.

tests/data/chat_templates/snippets.txt holds templates separated by lines of "===": expressions, filters, tests,
whitespace control, scoping, errors. Each is rendered by transformers (apply_chat_template with chat_template=) and by
`kiln prompt` from a tokenizer directory holding that template; the bytes must match, and where transformers raises,
kiln must fail with an error naming the template line.
"""
import json

import pytest

from conftest import DATA, run_kiln

transformers = pytest.importorskip("transformers")

SNIPPETS = (DATA / "chat_templates" / "snippets.txt").read_text(encoding="utf-8").rstrip("\n").split("\n===\n")
MESSAGES = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def tokenizer(real_tokenizers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_tokenizers / "llama2"))


@pytest.fixture(scope="module")
def base_config(real_tokenizers):
    return json.loads((real_tokenizers / "llama2" / "tokenizer_config.json").read_text())


def render_both(template, tokenizer, base_config, tmp_path, kwargs=None):
    kwargs = kwargs or {}
    try:
        want = tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        want = e
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**base_config, "chat_template": template}))
    (tmp_path / "m.json").write_text(json.dumps({"messages": MESSAGES, **kwargs}))
    proc = run_kiln("prompt", tmp_path, "--messages", tmp_path / "m.json", check=False)
    return want, proc


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet(index, tokenizer, base_config, tmp_path, kiln_bin):
    template = SNIPPETS[index]
    want, proc = render_both(template, tokenizer, base_config, tmp_path)
    if isinstance(want, Exception):
        assert proc.returncode == 1, f"transformers raised {want!r}, kiln printed {proc.stdout!r}"
        assert "chat template line " in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_foreign_newlines_are_normalised(newline, tokenizer, base_config, tmp_path, kiln_bin):
    template = newline.join(["a", "  {% if true %}", "  b {{ 'c\r\nd' }}", "  {% endif %}", "e", ""])
    want, proc = render_both(template, tokenizer, base_config, tmp_path)
    assert proc.stdout == want


def test_extra_kwargs_reach_the_template(tokenizer, base_config, tmp_path, kiln_bin):
    template = "{{ flag }}|{{ n + 1 }}|{{ cfg.mode }}|{{ items | join(',') }}|{{ bos_token }}"
    kwargs = {"flag": False, "n": 41, "cfg": {"mode": "fast"}, "items": ["a", "b"], "bos_token": "<B>"}
    want, proc = render_both(template, tokenizer, base_config, tmp_path, kwargs)
    assert proc.stdout == want


def test_unsupported_filter_names_the_line(base_config, tmp_path, kiln_bin):
    template = "line one\n{{ 'x' }}\n{{ 'y' | urlize }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**base_config, "chat_template": template}))
    (tmp_path / "m.json").write_text(json.dumps(MESSAGES))
    proc = run_kiln("prompt", tmp_path, "--messages", tmp_path / "m.json", check=False)
    assert proc.returncode == 1
    assert "chat template line 3: unsupported filter 'urlize'" in proc.stderr


def test_integers_beyond_64_bits_fail_clearly(base_config, tmp_path, kiln_bin):
    # Python has big integers; kiln refuses rather than wrapping around.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**base_config, "chat_template": "{{ 2 ** 64 }}"}))
    (tmp_path / "m.json").write_text(json.dumps(MESSAGES))
    proc = run_kiln("prompt", tmp_path, "--messages", tmp_path / "m.json", check=False)
    assert proc.returncode == 1
    assert "integer overflow" in proc.stderr
