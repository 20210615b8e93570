#!/usr/bin/env python3
"""Encode throughput of `kiln tokenize` vs Hugging Face `tokenizers`, single-threaded, on the same corpus in one run.

Usage: scripts/bench_tokenizer.py TOKENIZER_DIR_OR_JSON [--kiln build/tools/kiln] [--text FILE] [--repeat N]

The corpus defaults to tests/data/text/*.txt plus the tokenizer parity corpus, repeated to a few MB. kiln's time is
measured by the tool itself around encode() (--bench prints it), so process start and file loading are excluded on
both sides. Prints MB/s for each and the ratio kiln/HF (>1 means kiln is faster).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def corpus(args):
    if args.text:
        text = Path(args.text).read_text("utf-8")
    else:
        parts = [p.read_text("utf-8") for p in sorted((REPO / "tests" / "data" / "text").glob("*.txt"))]
        lines = (REPO / "tests" / "data" / "tokenizer_corpus" / "corpus.jsonl").read_text("utf-8").split("\n")
        parts += [json.loads(line) for line in lines if line]
        text = "\n".join(parts)
    return text * args.repeat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--kiln", default=os.environ.get("KILN_BIN", str(REPO / "build" / "tools" / "kiln")))
    ap.add_argument("--text")
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    path = Path(args.path)
    tok_json = path / "tokenizer.json" if path.is_dir() else path
    text = corpus(args)
    docs = text.split("\n\n")  # paragraphs: realistic request sizes
    nbytes = len(text.encode("utf-8"))
    tmp = REPO / "build-bench-input.txt"
    tmp.write_text("\n".join(json.dumps(d) for d in docs) + "\n", "utf-8")
    try:
        hf = Tokenizer.from_file(str(tok_json))
        t0 = time.perf_counter()
        hf_ids = [hf.encode(d).ids for d in docs]
        hf_s = time.perf_counter() - t0
        proc = subprocess.run([args.kiln, "tokenize", str(tok_json), "--raw", "--file", str(tmp), "--json-lines",
                               "--bench"], capture_output=True, text=True, check=True)
        kiln_s = float(json.loads(proc.stdout.strip().splitlines()[-1])["encode_seconds"])
        n_ids = sum(map(len, hf_ids))
    finally:
        tmp.unlink(missing_ok=True)
    hf_mbs, kiln_mbs = nbytes / hf_s / 1e6, nbytes / kiln_s / 1e6
    print(f"corpus: {nbytes / 1e6:.2f} MB in {len(docs)} documents, {n_ids} tokens ({tok_json})")
    import tokenizers
    kiln_tokens = int(json.loads(proc.stdout.strip().splitlines()[-1])["tokens"])
    if kiln_tokens != n_ids:
        print(f"warning: kiln produced {kiln_tokens} tokens, HF {n_ids}", file=sys.stderr)
    print(f"HF tokenizers {tokenizers.__version__:8s}: {hf_mbs:8.2f} MB/s")
    print(f"kiln                  : {kiln_mbs:8.2f} MB/s")
    print(f"ratio kiln/HF: {kiln_mbs / hf_mbs:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
