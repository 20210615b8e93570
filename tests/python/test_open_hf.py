"""Runtime commands open an HF checkpoint directory directly, converting it in memory with convert's code: the
logits must be bit-identical to those of the workspace that `kiln convert` writes from the same directory."""
import json

import pytest
from safetensors.numpy import load_file

from conftest import run_kiln

VARIANTS = ["llama-fp32-sharded", "qwen3-bf16-tied", "qwen2-tied-fp32", "mistral-bf16"]


@pytest.mark.parametrize("name", VARIANTS)
def test_hf_dir_logits_equal_converted_workspace(fixture_models, tmp_path, name):
    src = fixture_models / name
    ws = tmp_path / "ws"
    run_kiln("convert", src, "-o", ws)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3, 99, 7]))
    a, b = tmp_path / "hf.safetensors", tmp_path / "ws.safetensors"
    ra = json.loads(run_kiln("eval", src, "--tokens", tokens, "--ctx", "16", "--save-logits", a, "--json").stdout)
    rb = json.loads(run_kiln("eval", ws, "--tokens", tokens, "--ctx", "16", "--save-logits", b, "--json").stdout)
    assert ra["ppl"] == rb["ppl"]
    la, lb = load_file(a), load_file(b)
    assert (la["tokens"] == lb["tokens"]).all()
    assert la["logits"].tobytes() == lb["logits"].tobytes()


def test_generate_on_hf_dir(fixture_models):
    out = json.loads(run_kiln("generate", fixture_models / "llama-tied-fp32", "--prompt", "Hello", "-n", "4",
                              "--json").stdout)
    assert out["completion_tokens"] == 4


def test_unusable_path_is_one_line(fixture_models, tmp_path):
    r = run_kiln("generate", tmp_path, "--prompt", "hi", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "neither a kiln workspace" in r.stderr
