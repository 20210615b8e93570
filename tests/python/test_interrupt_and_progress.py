"""Two promises of every long-running command (README, docs/workspace.md):

- Ctrl-C (SIGINT) ends `quantize`, `export` and `calibrate` with exit status 130, a one-line "interrupted" message,
  and nothing left behind: no output, no hidden staging directory or temporary file. (`convert` is tested in
  test_convert.py.) The model is made large enough (48M parameters) that each command is still working when the
  signal arrives; a command that finished first fails the test rather than skipping it.
- Progress bars are drawn only when stderr is a terminal and --json is off; with --json, commands that count layers
  print one JSON line per layer on stderr instead. The terminal is a real pseudo-terminal
  (Python's pty module), so the check is the one isatty() makes.
"""
import json
import os
import pty
import select
import signal
import subprocess
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, copy_tokenizer, kiln_binary, progress_lines, run_kiln

CALIB = REPO / "tests" / "data" / "text" / "devils_dictionary_calib.txt"


def run_in_pty(args, until=None, timeout=300):
    """Runs kiln with stderr on a pseudo-terminal (stdout a pipe). With `until`, sends SIGINT as soon as that text
    has appeared on the terminal. Returns (exit status, terminal output, stdout)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(kiln_binary()), *map(str, args)], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    out, sent = b"", False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        if until and not sent and until.encode() in out:
            proc.send_signal(signal.SIGINT)
            sent = True
        if not ready and proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.communicate(timeout=timeout)[0]
    return proc.returncode, out.decode(errors="replace"), stdout.decode()


def interrupt_when(args, appears, timeout=300):
    """Runs kiln with pipes and sends SIGINT as soon as `appears()` is true (polled every millisecond)."""
    proc = subprocess.Popen([str(kiln_binary()), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not appears():
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def assert_interrupted(status, err, command):
    assert status == 130, f"kiln {command} exited {status} (finished before the signal?):\n{err}"
    lines = [line for line in err.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(lines) == 1 and lines[0].startswith(f"kiln {command}: interrupted"), err


def listing(d):
    return sorted(p.name for p in d.iterdir())


@pytest.fixture(scope="module")
def big(fixture_models, tmp_path_factory):
    """A 4-layer Llama with hidden size 512 (48M parameters), converted, and its RTN-quantized workspace."""
    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(root / "hf")
    copy_tokenizer(fixture_models / "llama-fp32-sharded", root / "hf")
    run_kiln("convert", root / "hf", "-o", root / "ws")
    run_kiln("quantize", root / "ws", "-o", root / "rtn", "--method", "rtn", "--group-size", 128)
    return root


def test_quantize_interrupt_leaves_nothing(big, tmp_path):
    status, err = interrupt_when(["quantize", big / "ws", "-o", tmp_path / "q", "--method", "awq", "--data", CALIB,
                                  "--samples", 32, "--seqlen", 128],
                                 lambda: any(p.name.startswith(".q") for p in tmp_path.iterdir()))
    assert_interrupted(status, err, "quantize")
    assert listing(tmp_path) == []


def test_export_interrupt_leaves_nothing(big, tmp_path):
    status, err = interrupt_when(["export", big / "rtn", "--format", "autoawq", "-o", tmp_path / "e"],
                                 lambda: any(p.name.startswith(".e") for p in tmp_path.iterdir()))
    assert_interrupted(status, err, "export")
    assert listing(tmp_path) == []


def test_calibrate_interrupt_leaves_nothing(big, tmp_path):
    """calibrate writes its files only at the end; its progress bar on a terminal shows it is working."""
    status, term, _ = run_in_pty(["calibrate", big / "ws", "--data", CALIB, "--samples", 64, "--seqlen", 128,
                                  "--batch-tokens", 128, "-o", tmp_path / "stats.safetensors"], until="calibrate ")
    assert_interrupted(status, term, "calibrate")
    assert listing(tmp_path) == []


# --- progress only on a terminal ---------------------------------------------------------------------------------
def commands(fixture_models, ws, tmp_path):
    """(label drawn by the bar, kiln arguments) of each command with a progress bar, on a small fixture."""
    return {
        "convert": ("converting", ["convert", fixture_models / "qwen3-fp32", "-o", tmp_path / "c"]),
        "quantize": ("quantizing", ["quantize", ws, "-o", tmp_path / "q", "--method", "rtn", "--group-size", 32]),
        "calibrate": ("calibrate", ["calibrate", ws, "--data", CALIB, "--samples", 4, "--seqlen", 64, "-o",
                                    tmp_path / "s.safetensors"]),
        "export": ("exporting", ["export", tmp_path / "q", "--format", "autoawq", "-o", tmp_path / "e"]),
    }


@pytest.fixture(scope="module")
def small_ws(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "ws"
    run_kiln("convert", fixture_models / "qwen3-fp32", "-o", out)
    return out


@pytest.mark.parametrize("json_flag", [False, True])
def test_progress_only_on_a_terminal_and_without_json(fixture_models, small_ws, tmp_path, json_flag):
    for name, (label, args) in commands(fixture_models, small_ws, tmp_path / "tty").items():
        (tmp_path / "tty").mkdir(exist_ok=True)
        status, term, stdout = run_in_pty([*args, *(["--json"] if json_flag else [])])
        assert status == 0, (name, term)
        drawn = "\r\x1b[K" in term and label in term and "100%" in term
        if json_flag:  # machine output: no bar even on a terminal, and stdout is pure JSON
            assert not drawn and "\x1b[K" not in term, (name, term)
            json.loads(stdout)
        else:
            assert drawn, (name, repr(term))
    # The same commands with stderr a pipe (a log): no bar, no carriage return.
    for name, (label, args) in commands(fixture_models, small_ws, tmp_path / "pipe").items():
        (tmp_path / "pipe").mkdir(exist_ok=True)
        r = run_kiln(*args, *(["--json"] if json_flag else []))
        # With --json, a command that counts layers reports each one as a JSON line instead (for pipelines).
        lines = progress_lines(r.stderr, label)
        layers = json.loads((small_ws / "kiln.json").read_text())["model"]["num_layers"]
        assert len(lines) == (layers if json_flag and name == "calibrate" else 0), (name, r.stderr)
        rest = "\n".join(x for x in r.stderr.splitlines() if not x.startswith('{"progress":'))
        assert "\r" not in rest and "\x1b" not in rest and label not in rest, (name, r.stderr)
