"""The device choice at the CLI: KILN_DEVICE=cpu|cuda, and serve's --kv-cache-fraction. Errors are one line and exit
non-zero; with a CUDA device, greedy generation on it gives the CPU backend's tokens (an fp32 fixture, where the two
backends differ only in summation order)."""
import json
import os

import pytest

from conftest import run_kiln

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
