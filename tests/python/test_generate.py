"""kiln generate: seeded sampling, batch independence, stop strings, chat prompts.

The fixture models are random, so their text is gibberish, but it is deterministic gibberish: exactly what these
properties need. qwen3-fp32 has no EOS id, so every run goes to its token limit unless a stop string ends it.
"""
import json
import subprocess

import pytest

from conftest import kiln_binary, run_kiln

MODEL = "qwen3-fp32"


@pytest.fixture(scope="module")
def ws(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_ws") / MODEL
    run_kiln("convert", fixture_models / MODEL, "-o", out)
    return out


def gen(ws, *args, prompt="Once upon a time"):
    return json.loads(run_kiln("generate", ws, "--prompt", prompt, "--ctx", 512, "--json", *args).stdout)


SAMPLED = ("--temperature", 0.9, "--top-p", 0.95, "--top-k", 200, "-n", 16)


def test_seed_is_reproducible_and_seeds_differ(ws):
    a = gen(ws, *SAMPLED, "--seed", 7)
    b = gen(ws, *SAMPLED, "--seed", 7)
    c = gen(ws, *SAMPLED, "--seed", 8)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["seed"] == 7 and c["seed"] == 8
    assert a["token_ids"] != c["token_ids"]
    assert a["completion_tokens"] == 16 and a["finish_reason"] == "length"
    # Sampling really happens: greedy gives something else.
    assert gen(ws, "-n", 16)["token_ids"] != a["token_ids"]


def test_batch_neighbours_do_not_change_a_sequence(ws):
    """--batch 3 runs seeds 7, 8, 9 in one ragged forward per step; each equals its run alone."""
    batch = gen(ws, *SAMPLED, "--seed", 7, "--batch", 3)["sequences"]
    assert [s["seed"] for s in batch] == [7, 8, 9]
    for s in batch:
        alone = gen(ws, *SAMPLED, "--seed", s["seed"])
        assert s["token_ids"] == alone["token_ids"]
    # And with penalties, whose state is per sequence too.
    pen = ("--repetition-penalty", 1.3, "--presence-penalty", 0.5, "--frequency-penalty", 0.5, "--min-p", 0.01)
    batch = gen(ws, *SAMPLED, *pen, "--seed", 3, "--batch", 2)["sequences"]
    assert batch[1]["token_ids"] == gen(ws, *SAMPLED, *pen, "--seed", 4)["token_ids"]


def test_stop_strings_cut_exactly(ws):
    full = gen(ws, "-n", 40)
    text = full["text"]
    assert len(text) > 20, text
    # A stop string from the middle of the greedy output (it likely spans a token boundary), and one that never occurs.
    mid = len(text) // 2
    stop = text[mid:mid + 3]
    cut = text.find(stop)
    res = gen(ws, "-n", 40, "--stop", stop, "--stop", "\u2603never\u2603")
    assert res["text"] == text[:cut]
    assert res["finish_reason"] == "stop"
    assert res["token_ids"] == full["token_ids"][:len(res["token_ids"])]
    # The streamed text (no --json) is the same, stop string held back and dropped.
    streamed = subprocess.run([str(kiln_binary()), "generate", str(ws), "--prompt", "Once upon a time", "--ctx", "512",
                               "-n", "40", "--stop", stop], capture_output=True, check=True).stdout
    assert streamed.decode() == text[:cut] + "\n"  # bytes: text mode would rewrite the model's "\r\n"
    # Without a match the output is untouched.
    res = gen(ws, "-n", 40, "--stop", "\u2603never\u2603")
    assert res["text"] == text and res["finish_reason"] == "length"


def test_token_limit_and_context(ws):
    res = gen(ws, "-n", 5)
    assert res["completion_tokens"] == 5 and res["finish_reason"] == "length"
    # The context caps the completion: prompt + completion <= --ctx.
    res = json.loads(run_kiln("generate", ws, "--prompt", "Once upon a time", "--ctx", 8, "-n", 100,
                              "--json").stdout)
    assert res["prompt_tokens"] + res["completion_tokens"] == 8 and res["finish_reason"] == "length"


def test_chat_messages_file_equals_chat_flag(ws, tmp_path):
    """--chat wraps the prompt as one user message; --messages takes a whole conversation."""
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "Hello"}]))
    a = gen(ws, "--chat", "-n", 6, prompt="Hello")
    b = json.loads(run_kiln("generate", ws, "--messages", msgs, "--ctx", 512, "-n", 6, "--json").stdout)
    assert a["token_ids"] == b["token_ids"] and a["prompt_tokens"] == b["prompt_tokens"]


def test_chat_prompt_tokens_match_transformers(fixture_models, ws):
    """The template's tokens, encoded as apply_chat_template(tokenize=True) encodes them (no extra special tokens)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(fixture_models / MODEL)
    msgs = [{"role": "user", "content": "Hi there, how are you?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    res = gen(ws, "--chat", "-n", 1, prompt=msgs[0]["content"])
    assert res["prompt_token_ids"] == ids and res["prompt_tokens"] == len(ids)
    # A conversation through --messages, system turn and an earlier answer included.
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke"}]
    (ws.parent / "conv.json").write_text(json.dumps(conv))
    res = json.loads(run_kiln("generate", ws, "--messages", ws.parent / "conv.json", "--ctx", 512, "-n", 1,
                              "--json").stdout)
    assert res["prompt_token_ids"] == tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)


def test_invalid_sampling_flags(ws):
    proc = run_kiln("generate", ws, "--prompt", "x", "--top-p", 1.5, check=False)
    assert proc.returncode != 0 and "top-p" in proc.stderr and proc.stderr.count("\n") == 1
