"""Shared pytest fixtures: the kiln binary, the real test tokenizers, and the transformers-written fixture models."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
REAL_TOKENIZERS = sorted(p.parent.name for p in (DATA / "tokenizers").glob("*/tokenizer.json.gz"))
sys.path.insert(0, str(REPO / "scripts"))


# A whole run writes tens of GB of checkpoints and workspaces, more than a CI machine's disk may hold: a passing test's
# tmp_path goes when it ends (pytest.ini: tmp_path_retention_policy), and what a module's fixtures made goes when the
# module ends. A session-scoped fixture's directory must outlive the module that first asks for it: its name starts
# with SESSION_SCRATCH.
SESSION_SCRATCH = "session-"


@pytest.fixture(scope="module", autouse=True)
def _module_scratch_is_removed(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    for p in set(base.iterdir()) - before:
        if not p.name.startswith(SESSION_SCRATCH):
            shutil.rmtree(p, ignore_errors=True)


def kiln_binary() -> Path:
    return Path(os.environ.get("KILN_BIN", REPO / "build" / "tools" / "kiln"))


@pytest.fixture(scope="session")
def kiln_bin():
    path = kiln_binary()
    if not path.exists():
        pytest.fail(f"kiln binary not found at {path}; build first or set KILN_BIN")
    return path


def run_kiln(*args, check=True, input=None, env=None, timeout=600):
    """Runs kiln; returns CompletedProcess with text stdout/stderr."""
    proc = subprocess.run([str(kiln_binary()), *map(str, args)], capture_output=True, text=True, input=input,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def progress_lines(stderr, label):
    """The JSON progress objects (--json) that a command printed on stderr for `label`, checked for consistency: one
    per finished item, counting up by one to the total, the ETA zero at the end."""
    objs = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"progress":')]
    objs = [o for o in objs if o["progress"] == label]
    if objs:
        first = objs[0]["done"]
        assert [o["done"] for o in objs] == list(range(first, first + len(objs))), objs
        assert objs[-1]["done"] == objs[-1]["total"] and objs[-1]["eta_seconds"] == 0, objs
        assert all(o["seconds"] >= o["item_seconds"] >= 0 and o["unit"] == "layers" for o in objs), objs
    return objs


def convert_refused(src, tmp_path) -> str:
    """Converts a checkpoint that must be refused: exit 1, one line on stderr, and nothing written (not even a staging
    sibling). Returns the line."""
    out = tmp_path / "refused-ws"
    r = run_kiln("convert", src, "-o", out, check=False)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert not any(p.name.startswith(out.name) or p.name.startswith("." + out.name) for p in tmp_path.iterdir())
    return lines[0]


def save_sharded_bin(sd, dst: Path):
    """`sd` as two torch.save shards with pytorch_model.bin.index.json, as save_pretrained(safe_serialization=False)
    writes them (THUDM's ChatGLM checkpoints ship this way)."""
    import torch
    names = sorted(sd)
    weight_map = {}
    for n, keys in enumerate([names[: len(names) // 2], names[len(names) // 2:]]):
        fname = f"pytorch_model-{n + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in keys}, dst / fname)
        weight_map.update({k: fname for k in keys})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def copy_tokenizer(src: Path, dst: Path):
    """Gives a checkpoint written in a test the tokenizer files of a fixture model."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory):
    """One subdirectory per real tokenizer of tests/data/tokenizers (llama2/, qwen3/, ...), each holding tokenizer.json
    and tokenizer_config.json."""
    root = tmp_path_factory.mktemp(SESSION_SCRATCH + "tokenizers")
    for name in REAL_TOKENIZERS:
        src = DATA / "tokenizers" / name
        dst = root / name
        dst.mkdir()
        with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(dst / "tokenizer.json", "wb") as out:
            shutil.copyfileobj(f, out)
        shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    return root


@pytest.fixture(scope="session")
def fixture_models(real_tokenizers):
    """Tiny checkpoints written by transformers (scripts/make_fixtures.py), one directory per variant."""
    root = Path(os.environ.get("KILN_FIXTURES", REPO / "build" / "fixtures"))
    if not (root / "index.json").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_fixtures.py"), "--out", str(root),
                        "--tokenizers", str(real_tokenizers)], check=True)
    return root


# --- in CI (KILN_CI=1, set by scripts/run_tests.sh) only CUDA and llama.cpp tests may skip ------------------------------
# Set-up installs every oracle (transformers, the real model, AutoAWQ, Chromium, the openai client...), so a skip of
# anything else there means set-up is broken, and a green run would hide that those oracles never ran. llama.cpp is
# built from source (KILN_WITH_LLAMA_CPP=1 scripts/setup.sh, minutes on 2 cores): scripts/run_tests.sh builds it in the
# background while the other tests run, then runs the tests marked llama_cpp with KILN_CI_LLAMA_CPP=1, where a
# llama.cpp skip fails too.
def _ci_forbids(reason) -> bool:
    reason = str(reason).lower()
    if os.environ.get("KILN_CI") != "1" or "cuda" in reason:
        return False
    return os.environ.get("KILN_CI_LLAMA_CPP") == "1" or "llama.cpp oracle" not in reason


def pytest_configure(config):
    config.addinivalue_line("markers", "llama_cpp: runs llama.cpp (PyPI llama-cpp-python) as the oracle")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _ci_forbids(_skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"KILN_CI=1: only CUDA and llama.cpp tests may skip, but this one skipped: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _ci_forbids(_skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"KILN_CI=1: only CUDA and llama.cpp tests may skip, but {collector.nodeid} skipped: {_skip_reason(report)}"
