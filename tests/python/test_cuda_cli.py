"""The device choice at the CLI: KILN_DEVICE=cpu|cuda, and serve's --kv-cache-fraction. Errors are one line and exit
non-zero; with a CUDA device, greedy generation on it gives the CPU backend's tokens (an fp32 fixture, where the two
backends differ only in summation order)."""
import json
import os

import pytest

from safetensors.numpy import load_file

from conftest import REPO, run_kiln

FIXTURE = "llama-fp32-sharded"


def cuda_devices():
    out = json.loads(run_kiln("devices", "--json").stdout)
    return out["cuda"]["devices"] if out["cuda"]["compiled"] else []


def env_with(**kv):
    env = dict(os.environ)
    env.update(kv)
    return env


def one_line_error(proc, needle):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_unknown_device_is_one_line_error(fixture_models, kiln_bin):
    proc = run_kiln("generate", fixture_models / FIXTURE, "--prompt", "Hello", "-n", "1", check=False,
                    env=env_with(KILN_DEVICE="tpu"))
    one_line_error(proc, "KILN_DEVICE must be cpu or cuda")


def test_cuda_without_device_is_one_line_error(fixture_models, kiln_bin):
    if cuda_devices():
        pytest.skip("a CUDA device is present")
    proc = run_kiln("generate", fixture_models / FIXTURE, "--prompt", "Hello", "-n", "1", check=False,
                    env=env_with(KILN_DEVICE="cuda"))
    one_line_error(proc, "the cuda device is not available")


def test_kv_cache_fraction_is_checked(fixture_models, kiln_bin):
    ws = fixture_models / FIXTURE
    proc = run_kiln("serve", ws, "--port", "0", "--kv-cache-fraction", "1.5", check=False, env=env_with(KILN_DEVICE="cpu"))
    one_line_error(proc, "--kv-cache-fraction: must be in (0, 1)")
    assert proc.returncode == 2  # a usage error, found when the flags are parsed
    # Known only once the model is on the backend, so serve's load-time notes (this fixture has no chat template) may
    # come first; the error itself is one line, and the last.
    proc = run_kiln("serve", ws, "--port", "0", "--kv-cache-fraction", "0.5", check=False, env=env_with(KILN_DEVICE="cpu"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--kv-cache-fraction needs a device backend" in proc.stderr.strip().splitlines()[-1]


def test_greedy_generation_on_cuda_matches_cpu(fixture_models, kiln_bin):
    if not cuda_devices():
        pytest.skip("no CUDA device")
    args = ("generate", fixture_models / FIXTURE, "--prompt", "Hello", "-n", "12", "--temperature", "0", "--ignore-eos")
    cpu = run_kiln(*args, env=env_with(KILN_DEVICE="cpu")).stdout
    gpu = run_kiln(*args, env=env_with(KILN_DEVICE="cuda")).stdout
    assert gpu == cpu


CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"
AWQ_ARGS = ("--method", "awq", "--group-size", "32", "--data", CALIB, "--samples", "8", "--seqlen", "64", "--seed", "1")


def test_awq_quantize_without_device_is_one_line_error(fixture_models, kiln_bin, tmp_path):
    if cuda_devices():
        pytest.skip("a CUDA device is present")
    run_kiln("convert", fixture_models / FIXTURE, "-o", tmp_path / "ws", "--dtype", "fp32")
    proc = run_kiln("quantize", tmp_path / "ws", "-o", tmp_path / "q", *AWQ_ARGS, check=False,
                    env=env_with(KILN_DEVICE="cuda"))
    one_line_error(proc, "the cuda device is not available")
    assert not (tmp_path / "q").exists()


# The AWQ search on the GPU (runtime/cuda/cuda_awq.cu) against the CPU's: the kernels differ only in summation order
# (fp32 GEMMs without TF32, double reductions), so the chosen alphas are the same and the int4 codes nearly all are
# (a clip threshold may flip on a tie within rounding). PROVISIONAL: no GPU has run this yet.
@pytest.mark.parametrize("loss", ["block", "linear"])
def test_awq_on_cuda_matches_cpu(loss, fixture_models, kiln_bin, tmp_path):
    if not cuda_devices():
        pytest.skip("no CUDA device")
    run_kiln("convert", fixture_models / FIXTURE, "-o", tmp_path / "ws", "--dtype", "fp32")
    for dev in ("cpu", "cuda"):
        run_kiln("quantize", tmp_path / "ws", "-o", tmp_path / dev, *AWQ_ARGS, "--awq-loss", loss,
                 env=env_with(KILN_DEVICE=dev))
    alpha = {d: json.loads((tmp_path / d / "kiln.json").read_text())["quantization"]["weights"]["awq"]["alpha"]
             for d in ("cpu", "cuda")}
    assert alpha["cuda"] == alpha["cpu"]

    def tensors(d):
        return {k: v for f in sorted((tmp_path / d).glob("weights-*.safetensors")) for k, v in load_file(str(f)).items()}
    cpu, gpu = tensors("cpu"), tensors("cuda")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if name.endswith(".qweight"):
            assert (cpu[name] == gpu[name]).mean() > 0.99, name


# fixture -> tokens. The CUDA backend against transformers directly (the gtest test_cuda_model.cpp compares it with
# the CPU backend). fp32 workspaces: cublasSgemm without TF32, so only summation order differs: the CPU parity bound
# of test_runtime.py, 1e-3 (there measured ~1e-5). bf16 workspaces: the CUDA backend rounds every Linear input to bf16
# (docs/cuda.md) and keeps a bf16 KV cache, so transformers does the same here (a pre-hook on every Linear, and
# hf_oracle.RoundingCache); what remains is summation order plus the rare activation that lands on the other side of
# a bf16 rounding boundary. Not rounding at all moves these fixtures' logits by up to 0.0045 (1 + max|logit|)
# (docs/cuda.md); the bound is 1e-3 (1 + max|logit|), a quarter of that, so the test still tells the emulated rounding
# from none. PROVISIONAL: no GPU has run this yet (scripts/gpu_check.sh prints the measured values); tighten it to a
# stated multiple of the measurement after the first GPU run.
CUDA_VS_HF = {"llama-fp32-sharded": 64, "qwen3-fp32": 40, "mistral-fp32-sharded": 100, "llama-bf16": 64,
              "qwen3-bf16-tied": 40, "llama3-rope-bf16": 160}


@pytest.mark.parametrize("name", list(CUDA_VS_HF))
def test_cuda_logits_match_transformers(name, fixture_models, kiln_bin, tmp_path):
    if not cuda_devices():
        pytest.skip("no CUDA device")
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from hf_oracle import bf16_store, cached_logits, hf_fp32
    rng = np.random.default_rng(len(name))
    ids = [int(x) for x in rng.integers(3, 31000, size=CUDA_VS_HF[name])]
    (tmp_path / "t.json").write_text(json.dumps(ids))
    ws = tmp_path / "ws"
    run_kiln("convert", fixture_models / name, "-o", ws)
    run_kiln("eval", ws, "--tokens", tmp_path / "t.json", "--ctx", len(ids), "--save-logits", tmp_path / "l",
             env=env_with(KILN_DEVICE="cuda"))
    got = load_file(str(tmp_path / "l"))["logits"]
    model = hf_fp32(fixture_models / name)
    bf16 = "bf16" in name
    if bf16:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(lambda mod, args: (args[0].to(torch.bfloat16).float(),))
    want = cached_logits(model, ids, bf16_store if bf16 else None)
    diff = float(np.abs(got - want).max())
    bound = 1e-3 * (1 + float(np.abs(want).max()) if bf16 else 1)
    print(f"{name}: CUDA vs transformers max |logit diff| {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound
