"""KILN_CPU_BF16_DOT=1: the CPU's bf16 linears take `vdpbf16ps`, which rounds each Linear input to bf16
(runtime/cpu/matmul_bf16.h). The oracle is transformers in fp32 with the same rounding applied by a pre-hook on every
Linear, the LM head included (as for the CUDA backend, test_cuda_cli.py); the KV cache is fp32 on both sides so that
the cache adds no rounding of its own.

Tolerance. Where kiln and the oracle round the same activations, logits agree to ~1e-6. But an activation that sits
on a bf16 rounding boundary can round to the neighbouring value after fp32 summation-order noise: one bf16 step
(2^-8 relative) in one element, which moved these fixtures' logits by up to 5e-3 at that position and, when it feeds
the KV cache, at the later ones. So the check is hf_oracle.int8_logits_close's: either at most 10% of the positions
differ by more than 1e-4, or the first half of them match within 1e-4; none by more than 1e-2. Not rounding at all
differs from the oracle by ~6e-3 at every position: the test also asserts that the leading positions are that far from
the unrounded oracle, so it tells the dot kernel from the exact one. On a CPU without AVX-512 (F, BW) and AVX512_BF16
the setting has no effect, and the logits must match the unrounded oracle within test_runtime.py's 1e-3."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_kiln
from hf_oracle import cached_logits, hf_fp32, int8_logits_close

FIXTURES = {"qwen3-bf16-tied": 40}  # tied bf16 LM head, q/k norms; llama-bf16 (64 tokens) passes too
MATCH = 1e-4


def cpu_has_bf16_dot():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16"} <= set(line.split(":", 1)[1].split())
    return False


@pytest.mark.parametrize("name", list(FIXTURES))
def test_bf16_dot_logits_match_transformers_with_rounded_inputs(name, fixture_models, tmp_path):
    rng = np.random.default_rng(len(name))
    ids = [int(x) for x in rng.integers(3, 31000, size=FIXTURES[name])]
    (tmp_path / "t.json").write_text(json.dumps(ids))
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / name, "-o", ws)
    env = dict(os.environ, KILN_CPU_BF16_DOT="1", KILN_DEVICE="cpu")
    env.pop("KILN_CPU_ISA", None)
    run_kiln("eval", ws, "--tokens", tmp_path / "t.json", "--ctx", len(ids), "--save-logits", tmp_path / "l",
             "--kv-cache", "fp32", env=env)
    got = load_file(str(tmp_path / "l"))["logits"]
    model = hf_fp32(fixture_models / name)
    exact = cached_logits(model, ids)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16).float(),))
    rounded = cached_logits(model, ids)
    per_pos = np.abs(got - rounded).max(-1)
    unrounded = np.abs(got - exact).max(-1)
    print(f"{name}: vs rounded-input oracle max {per_pos.max():.3g}, {int((per_pos > MATCH).sum())}/{len(ids)} "
          f"positions above {MATCH}; vs unrounded oracle min {unrounded.min():.3g}")
    if not cpu_has_bf16_dot():
        assert unrounded.max() <= 1e-3
        return
    assert int8_logits_close(got, rounded, MATCH, far_tol=1e-2)
    lead = per_pos.size if (per_pos <= MATCH).all() else int(np.flatnonzero(per_pos > MATCH)[0])
    assert lead > 0 and unrounded[:lead].min() > 10 * MATCH


def amx_in_use(env):
    return json.loads(run_kiln("devices", "--json", env=env).stdout)["cpu"]["amx_bf16"]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_amx_bf16_logits_match_unrounded_transformers(name, fixture_models, tmp_path):
    """Where the CPU has AMX-BF16 and Linux grants it, it is the default bf16 kernel (matmul_bf16_amx.cpp): x is split
    into three bf16 parts that sum exactly to it, so no activation is rounded. The logits must then match the
    unrounded fp32 oracle as the exact kernel's do (1e-4; rounding Linear inputs to bf16 moves them by ~6e-3, above),
    while differing from the exact kernel's in the last bits (another summation order: the test ran the AMX kernel).
    KILN_CPU_AMX=0 turns it off."""
    rng = np.random.default_rng(len(name) + 1)
    ids = [int(x) for x in rng.integers(3, 31000, size=FIXTURES[name])]
    (tmp_path / "t.json").write_text(json.dumps(ids))
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / name, "-o", ws)
    logits = {}
    for amx in ("1", "0"):
        env = dict(os.environ, KILN_CPU_AMX=amx, KILN_DEVICE="cpu")
        for k in ("KILN_CPU_ISA", "KILN_CPU_BF16_DOT"):
            env.pop(k, None)
        if amx == "0":
            assert not amx_in_use(env)
        run_kiln("eval", ws, "--tokens", tmp_path / "t.json", "--ctx", len(ids), "--save-logits", tmp_path / amx,
                 "--kv-cache", "fp32", env=env)
        logits[amx] = load_file(str(tmp_path / amx))["logits"]
    exact = cached_logits(hf_fp32(fixture_models / name), ids)
    diff = {k: float(np.abs(v - exact).max()) for k, v in logits.items()}
    print(f"{name}: max |logit - unrounded oracle|: amx {diff['1']:.3g}, exact kernel {diff['0']:.3g}")
    assert diff["0"] <= MATCH
    assert diff["1"] <= MATCH
    if amx_in_use(dict(os.environ, KILN_CPU_AMX="1")):
        assert not np.array_equal(logits["1"], logits["0"])
