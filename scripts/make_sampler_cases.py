#!/usr/bin/env python3
"""Writes tests/data/sampler_cases.json: logits rows, sampling params and the processed log-probabilities that
transformers computes for them. tests/unit/test_sampler.cpp holds kiln's sampler against these numbers.

The processors are not assembled by hand: the list comes from transformers' own GenerationMixin._get_logits_processor
on a tiny model, so the order (repetition penalty -> temperature -> top-k -> top-p -> min-p) is transformers' order,
not our reading of it. OpenAI presence/frequency penalties have no transformers equivalent; they are computed with
numpy and inserted right after the repetition penalty, where vLLM applies them.

Every case is computed twice, in float64 (the stored reference) and float32 (as generate would run on fp32 logits).
If the two disagree on which tokens survive, the case sits on a numerical knife edge and would make a flaky test, so
the script refuses it.

Ties at the top-p boundary: TopPLogitsWarper sorts with torch.sort, whose order among equal values is not specified
(it is not even stable on CPU for rows of a few dozen). kiln ranks equal logits by lower id first, as torch.argmax
does. In such cases the number of kept tokens and their log-probabilities are still transformers' (they do not depend
on the order), and the kept slots of the cut group are given to its lowest ids; the case is marked "top_p_tie".

Usage: scripts/make_sampler_cases.py [--out tests/data/sampler_cases.json]
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

ROOT = Path(__file__).resolve().parent.parent


def tiny_model():
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    return LlamaForCausalLM(cfg)


class OpenAIPenalties:
    """logit -= presence * (count > 0) + frequency * count, over generated tokens (numpy; no HF equivalent)."""

    def __init__(self, output, presence, frequency):
        self.output, self.presence, self.frequency = output, presence, frequency

    def __call__(self, input_ids, scores):
        counts = np.bincount(np.asarray(self.output, dtype=np.int64), minlength=scores.shape[-1])[: scores.shape[-1]]
        counts = torch.from_numpy(counts).to(scores.dtype)
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


def hf_processors(model, p, output):
    greedy = p.get("temperature", 1.0) == 0.0
    gc = GenerationConfig(do_sample=not greedy,
                          temperature=None if greedy else p.get("temperature", 1.0),
                          top_k=p["top_k"] if p.get("top_k", 0) > 0 else None,
                          top_p=p.get("top_p", 1.0),
                          min_p=p.get("min_p") or None,
                          repetition_penalty=p.get("repetition_penalty", 1.0))
    procs = list(model._get_logits_processor(gc, input_ids_seq_length=1, device="cpu"))
    presence, frequency = p.get("presence_penalty", 0.0), p.get("frequency_penalty", 0.0)
    if presence or frequency:
        at = 1 if procs and isinstance(procs[0], RepetitionPenaltyLogitsProcessor) else 0
        procs.insert(at, OpenAIPenalties(output, presence, frequency))
    return procs, greedy


def run(procs, logits, input_ids, dtype):
    scores = torch.tensor(np.asarray(logits, dtype=np.float32)[None, :], dtype=dtype)
    ids = torch.tensor([input_ids], dtype=torch.long)
    for proc in procs:
        scores = proc(ids, scores)
    return torch.log_softmax(scores.double(), dim=-1)[0].numpy()


def reference(model, case):
    p, logits = case["params"], np.asarray(case["logits"], dtype=np.float32)
    prompt, output = case.get("prompt", []), case.get("output", [])
    procs, greedy = hf_processors(model, p, output)
    ids = prompt + output
    lp64 = run(procs, logits, ids, torch.float64)
    lp32 = run(procs, logits, ids, torch.float32)
    mask = np.isfinite(lp64)
    assert (mask == np.isfinite(lp32)).all(), f"{case['name']}: float32 and float64 disagree on the kept set"

    # A group of equal logits cut in two can only come from top-p (top-k keeps ties, min-p is by value). Which
    # members transformers keeps then depends on torch.sort; kiln keeps the lowest ids. The count and the values
    # are order-independent, so re-assign the kept slots of each such group to its lowest ids.
    for value in np.unique(logits[np.isfinite(logits)]):
        group = np.flatnonzero(logits == value)
        kept = int(mask[group].sum())
        if 0 < kept < len(group):
            assert not has_penalties(p), f"{case['name']}: a tie cut by top-p after penalties is ambiguous"
            kept_lp = lp64[group][mask[group]][0]
            lp64 = lp64.copy()
            lp64[group] = -np.inf
            lp64[group[:kept]] = kept_lp
            mask = np.isfinite(lp64)
            case["top_p_tie"] = True

    case["expected_logprobs"] = [float(f"{v:.9g}") if np.isfinite(v) else None for v in lp64]
    case["kept"] = int(mask.sum())
    case["logits"] = [v if np.isfinite(v) else None for v in case["logits"]]  # JSON has no -inf: null
    if greedy:
        case["greedy_token"] = int(np.argmax(lp64))  # first max, as torch.argmax
    return case


def has_penalties(p):
    return (p.get("repetition_penalty", 1.0) != 1.0 or p.get("presence_penalty", 0.0) != 0.0
            or p.get("frequency_penalty", 0.0) != 0.0)


def rounded(x, decimals=2):
    return [float(v) for v in np.round(np.asarray(x, dtype=np.float64), decimals)]


def cases():
    rng = np.random.default_rng(20240611)
    randn = lambda n, scale=3.0: rounded(rng.standard_normal(n) * scale)
    out = []

    def add(name, logits, **params):
        prompt = params.pop("prompt", [])
        output = params.pop("output", [])
        out.append(dict(name=name, logits=logits, prompt=prompt, output=output, params=params))

    add("plain", randn(64))
    add("temperature_0.7", randn(64), temperature=0.7)
    add("temperature_1.5_top_k_10", randn(128), temperature=1.5, top_k=10)
    # Integer logits: six 4.0s tie at the 3rd-largest value; HF keeps every tie (8 tokens).
    add("top_k_ties_at_boundary", [5.0, 4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.0] * 2, top_k=3)
    add("top_p_0.9", randn(100), top_p=0.9)
    dominant = randn(50, 1.0)
    dominant[7] = 8.0
    add("top_p_keeps_one", dominant, top_p=0.5)
    add("top_p_ties_at_boundary", [2.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0, 0.5], top_p=0.7)
    add("min_p_dominant", dominant, min_p=0.1)
    add("min_p_0.05_temperature_0.8", randn(200), min_p=0.05, temperature=0.8)
    add("all_equal_top_k", [0.25] * 32, top_k=3)
    add("all_equal_top_p", [0.25] * 32, top_p=0.5)
    add("all_equal_min_p", [0.25] * 32, min_p=0.5)
    with_inf = randn(40, 1.0)
    for i in range(40):
        if i % 8:
            with_inf[i] = float("-inf")
    add("neg_inf_top_k_more_than_finite", with_inf, top_k=10, top_p=0.95)
    add("neg_inf_plain", with_inf)
    add("temperature_0.05", randn(64), temperature=0.05)
    add("temperature_0.001", randn(64), temperature=0.001)
    add("repetition_1.3", randn(64), repetition_penalty=1.3, prompt=[1, 2, 3, 5, 8, 13, 21, 34, 3, 3], output=[60, 2])
    add("repetition_0.8", randn(64), repetition_penalty=0.8, prompt=[4, 9, 16, 25, 36, 49], output=[63])
    add("presence_frequency", randn(64), presence_penalty=0.5, frequency_penalty=0.3, prompt=[0, 1, 2],
        output=[5, 5, 5, 7, 9, 9, 0])
    add("negative_presence_frequency_top_p", randn(64), presence_penalty=-1.0, frequency_penalty=-0.25, top_p=0.8,
        prompt=[3], output=[10, 11, 11, 12, 12, 12])
    add("all_penalties", randn(64), repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.2,
        temperature=0.9, prompt=[1, 2, 3, 4], output=[4, 5, 5, 6])
    add("combined", randn(1000), repetition_penalty=1.1, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05,
        prompt=list(range(0, 1000, 37)), output=[5, 6, 7, 5])
    ties = randn(64)
    ties[10] = ties[40] = max(ties) + 1.0
    add("greedy_tie_lowest_id", ties, temperature=0.0)
    pen = randn(64, 1.0)
    pen[3], pen[4] = 6.0, 5.5
    add("greedy_repetition_changes_argmax", pen, temperature=0.0, repetition_penalty=1.2, prompt=[3])
    add("greedy_frequency", pen, temperature=0.0, frequency_penalty=1.0, output=[3])
    # Large, flat rows: the nucleus spans several of the sampler's partial-sort chunks; top_k > 256 takes the
    # nth_element path, with ties at the boundary from one-decimal logits.
    add("flat_2048_top_p_0.95", rounded(rng.standard_normal(2048) * 0.5, 5), top_p=0.95)
    add("flat_2048_top_k_600_ties", rounded(rng.standard_normal(2048) * 2.0, 1), top_k=600, temperature=1.3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data" / "sampler_cases.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = tiny_model()
    result = [reference(model, c) for c in cases()]
    doc = {
        "generator": "scripts/make_sampler_cases.py",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "note": "expected_logprobs: log_softmax of transformers' processed scores (float64); null = filtered (-inf)",
        "cases": result,
    }
    text = json.dumps(doc, indent=None, separators=(",", ":"), allow_nan=False)
    # One case per line keeps diffs readable.
    text = text.replace(',{"name"', ',\n{"name"')
    Path(args.out).write_text(text + "\n")
    print(f"wrote {len(result)} cases to {args.out}")


if __name__ == "__main__":
    main()
