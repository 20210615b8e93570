"""Files that escape or get destroyed, configs that size memory, and flags out of range (issue 13, items 6-10 and the
file/flag cases of "Smaller"), each over the real binary on checkpoints written by transformers.

Oracles: the source files' bytes (an input must survive a refused command unchanged), Python's json + hashlib for the
kiln.json hash, the safetensors format as documented (a header written by hand), and the file system itself."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_kiln

SOURCE = "llama-bf16"  # a single-file checkpoint with the llama2 tokenizer


def tree_digest(root: Path):
    """Every file under root with its sha256: what must not change when a command is refused."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kiln_json_hash(doc):
    """The documented canonical form: every key but kiln_json_sha256, keys sorted, no whitespace."""
    body = {k: v for k, v in doc.items() if k != "kiln_json_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def ckpt(fixture_models, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(fixture_models / SOURCE, dst)
    return dst


@pytest.fixture(scope="module")
def converted(fixture_models, tmp_path_factory):
    ws = tmp_path_factory.mktemp("conv") / "ws"
    run_kiln("convert", fixture_models / SOURCE, "-o", ws)
    return ws


@pytest.fixture
def ws(converted, tmp_path):
    dst = tmp_path / "ws"
    shutil.copytree(converted, dst, symlinks=True)
    return dst


def refused(proc, *words, code=1):
    assert proc.returncode == code, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    err = proc.stderr.strip()
    for w in words:
        assert w in err, f"{w!r} not in:\n{err}"
    return err


# ---- 6. an output never overlaps an input ----

@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink", "trailing-slash"])
def test_convert_refuses_an_output_over_its_checkpoint(ckpt, tmp_path, where):
    before = tree_digest(ckpt)
    out = {"same": ckpt, "inside": ckpt / "ws", "contains": tmp_path, "trailing-slash": str(ckpt) + "/",
           "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        os.symlink(ckpt, out)
    err = refused(run_kiln("convert", ckpt, "-o", out, "--force", check=False), "the checkpoint")
    assert len(err.splitlines()) == 1
    assert tree_digest(ckpt) == before
    assert not list(ckpt.glob(".*kiln-tmp*")) and not list(tmp_path.glob(".*kiln-tmp*"))


def test_a_sibling_sharing_the_name_prefix_is_not_an_overlap(ckpt, tmp_path):
    run_kiln("convert", ckpt, "-o", str(ckpt) + "2")  # "hf2" is beside "hf", not inside it
    run_kiln("verify", str(ckpt) + "2")


def test_workspace_commands_refuse_an_output_over_their_input(ws, tmp_path):
    before = tree_digest(ws)
    data = tmp_path / "calib.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    cases = [
        ("quantize", ws, "-o", ws, "--force"),
        ("quantize", ws, "-o", ws / "q", "--force"),
        ("quantize", ws, "-o", tmp_path / "q", "--method", "awq", "--data", tmp_path / "q" / "d.txt"),
        ("quantize", ws, "-o", tmp_path / "q", "--method", "none", "--kv-cache", "int8", "--kv-mode", "static",
         "--kv-stats", tmp_path / "q" / "stats.safetensors"),
        ("export", ws, "--format", "autoawq", "-o", ws, "--force"),
        ("calibrate", ws, "--data", data, "-o", ws / "kiln.json", "--force"),
        ("calibrate", ws, "--data", data, "-o", data, "--force"),
        ("eval", ws, "--text", data, "--save-logits", ws / "weights-00001-of-00001.safetensors"),
    ]
    for args in cases:
        refused(run_kiln(*args, check=False), "the output")
    assert tree_digest(ws) == before


# ---- 7. tokenizer files: regular, inside the checkpoint, parseable, loadable ----

def test_symlinked_tokenizer_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    os.symlink("/etc/passwd", ckpt / "tokenizer.json")
    out = tmp_path / "ws"
    refused(run_kiln("convert", ckpt, "-o", out, check=False), "tokenizer.json", "outside the checkpoint")
    assert not out.exists()


def test_symlink_to_a_file_outside_with_valid_content_is_refused_too(ckpt, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(ckpt / "tokenizer_config.json", elsewhere / "tokenizer_config.json")
    os.symlink(elsewhere / "tokenizer_config.json", ckpt / "tokenizer_config.json")
    refused(run_kiln("convert", ckpt, "-o", tmp_path / "ws", check=False), "tokenizer_config.json", "outside")


def test_symlinked_chat_template_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    outside = tmp_path / "template.jinja"
    outside.write_text("{{ messages }}")
    os.symlink(outside, ckpt / "chat_template.jinja")
    refused(run_kiln("convert", ckpt, "-o", tmp_path / "ws", check=False), "chat_template.jinja", "outside")


def test_symlinks_inside_the_checkpoint_and_hf_cache_blobs_are_copied(fixture_models, tmp_path):
    # The layout huggingface_hub's cache uses: snapshots/REV/* are links into ../../blobs/.
    repo = tmp_path / "models--x--y"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (fixture_models / SOURCE).iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    # And a link inside the checkpoint itself.
    (snap / "tokenizer_config.json").unlink()
    shutil.copy(fixture_models / SOURCE / "tokenizer_config.json", snap / "real_tokenizer_config.json")
    os.symlink("real_tokenizer_config.json", snap / "tokenizer_config.json")
    out = tmp_path / "ws"
    run_kiln("convert", snap, "-o", out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (fixture_models / SOURCE / f).read_bytes()
        assert not (out / f).is_symlink()
    run_kiln("verify", out)


@pytest.mark.parametrize("case", ["bad-json-config", "bad-json-tokenizer", "not-a-tokenizer", "fifo"])
def test_broken_tokenizer_files_are_refused_before_copying(ckpt, tmp_path, case):
    if case == "bad-json-config":
        (ckpt / "tokenizer_config.json").write_text('{"model_max_length": 4096,')
        words = ("tokenizer_config.json", "not valid JSON")
    elif case == "bad-json-tokenizer":
        (ckpt / "tokenizer.json").write_text("[1, 2")
        words = ("tokenizer.json", "not valid JSON")
    elif case == "not-a-tokenizer":
        (ckpt / "tokenizer.json").write_text('{"hello": "world"}')
        words = ("tokenizer does not load",)
    else:
        (ckpt / "tokenizer.json").unlink()
        os.mkfifo(ckpt / "tokenizer.json")
        words = ("tokenizer.json", "FIFO")
    out = tmp_path / "ws"
    refused(run_kiln("convert", ckpt, "-o", out, check=False, timeout=120), *words)
    assert not out.exists() and not list(tmp_path.glob(".ws.kiln-tmp*"))


def test_verify_reports_a_symlink_planted_in_a_workspace(ws, tmp_path):
    copy = tmp_path / "tokenizer.json"
    shutil.copy(ws / "tokenizer.json", copy)
    (ws / "tokenizer.json").unlink()
    os.symlink(copy, ws / "tokenizer.json")  # same bytes, so only the link itself is wrong
    refused(run_kiln("verify", ws, check=False), "tokenizer.json", "symbolic link")


# ---- 8. kiln.json is covered by a hash ----

def test_kiln_json_hash_matches_an_independent_computation(ws):
    doc = json.loads((ws / "kiln.json").read_text())
    assert list(doc)[-1] == "kiln_json_sha256"
    assert doc["kiln_json_sha256"] == kiln_json_hash(doc)


def test_quantized_workspace_carries_a_valid_hash_too(ws, tmp_path):
    out = tmp_path / "q"
    run_kiln("quantize", ws, "-o", out, "--method", "rtn", "--group-size", "32")
    doc = json.loads((out / "kiln.json").read_text())
    assert doc["kiln_json_sha256"] == kiln_json_hash(doc)
    run_kiln("verify", out)


@pytest.mark.parametrize("edit", [("rope", "theta", 1.0), (None, "norm_eps", 0.5), (None, "vocab_size", 31999)])
def test_an_edited_model_field_is_refused_everywhere(ws, edit):
    doc = json.loads((ws / "kiln.json").read_text())
    block, key, value = edit
    target = doc["model"][block] if block else doc["model"]
    target[key] = value
    (ws / "kiln.json").write_text(json.dumps(doc, indent=2) + "\n")
    for args in (("verify", ws), ("inspect", ws), ("generate", ws, "--prompt", "Hi", "-n", "1")):
        refused(run_kiln(*args, check=False), "kiln.json", "kiln_json_sha256")


def test_a_rehashed_absurd_spec_is_refused_naming_the_field(ws):
    doc = json.loads((ws / "kiln.json").read_text())
    doc["model"]["norm_eps"] = -1.0
    doc["kiln_json_sha256"] = kiln_json_hash(doc)
    (ws / "kiln.json").write_text(json.dumps(doc, indent=2) + "\n")
    refused(run_kiln("generate", ws, "--prompt", "Hi", "-n", "1", check=False), "norm_eps")


def test_old_workspace_without_hash_loads_with_a_warning_and_fails_verify(ws):
    doc = json.loads((ws / "kiln.json").read_text())
    del doc["kiln_json_sha256"]
    (ws / "kiln.json").write_text(json.dumps(doc, indent=2) + "\n")
    r = run_kiln("generate", ws, "--prompt", "Hi", "-n", "2")
    assert "warning" in r.stderr and "kiln_json_sha256" in r.stderr
    refused(run_kiln("verify", ws, check=False), "kiln_json_sha256")


def test_load_checks_sizes_and_verify_flag_rehashes(ws):
    shard = ws / "weights-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # a bit of the last tensor: the file stays valid safetensors of the same size
    shard.write_bytes(bytes(data))
    run_kiln("generate", ws, "--prompt", "Hi", "-n", "1")  # opening checks sizes, not every byte
    refused(run_kiln("generate", ws, "--prompt", "Hi", "-n", "1", "--verify", check=False), "--verify", "sha256")
    refused(run_kiln("eval", ws, "--tokens", "/dev/null", "--verify", check=False), "--verify")
    with open(ws / "tokenizer_config.json", "a") as f:
        f.write(" ")
    refused(run_kiln("generate", ws, "--prompt", "Hi", "-n", "1", check=False), "tokenizer_config.json",
            "differs from the manifest")


# ---- 9. staging directories of killed runs ----

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_a_dead_process_is_removed(fixture_models, tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".ws.kiln-tmp-{dead}"
    live = tmp_path / f".ws.kiln-tmp-{os.getpid()}"
    other_name = tmp_path / f".other.kiln-tmp-{dead}"
    not_a_pid = tmp_path / ".ws.kiln-tmp-12ab"
    stale_weights = tmp_path / f".ws.kiln-weights-{dead}"  # quantize --kv-cache int8's intermediate int4 workspace
    for d in (stale, live, other_name, not_a_pid, stale_weights):
        d.mkdir()
        (d / "junk.safetensors").write_bytes(b"x" * 1000)
    old_of_dead = tmp_path / f".ws.kiln-old-{dead}"  # kept while ws does not exist: it may be the only copy
    old_of_dead.mkdir()
    run_kiln("convert", fixture_models / SOURCE, "-o", tmp_path / "ws")
    assert not stale.exists() and not stale_weights.exists()
    assert live.exists() and other_name.exists() and not_a_pid.exists() and old_of_dead.exists()
    # Once ws exists, the old output of a dead --force run is garbage too.
    run_kiln("convert", fixture_models / SOURCE, "-o", tmp_path / "ws", "--force")
    assert not old_of_dead.exists()


def test_staging_left_by_sigkill_is_removed_by_the_next_convert(fixture_models, tmp_path):
    out = tmp_path / "ws"
    for attempt in range(20):  # the kill must land while the staging directory exists
        proc = subprocess.Popen([str(Path(os.environ.get("KILN_BIN", Path(__file__).resolve().parents[2] / "build" /
                                                         "tools" / "kiln"))),
                                 "convert", fixture_models / "qwen2-bf16-sharded", "-o", out, "--dtype", "fp32"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staging = tmp_path / f".ws.kiln-tmp-{proc.pid}"
        while proc.poll() is None and not any(staging.glob("weights-*")):
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.skip("the conversion always finished before it could be killed")
    assert staging.is_dir() and not out.exists()  # what SIGKILL leaves: the hidden sibling only
    run_kiln("convert", fixture_models / SOURCE, "-o", out)
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_stale_calibrate_temp_file_is_removed(ws, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    stats = tmp_path / "stats.safetensors"
    stale = tmp_path / f".stats.safetensors.kiln-tmp-{dead_pid()}"
    stale.write_bytes(b"partial")
    run_kiln("calibrate", ws, "--data", data, "-o", stats, "--samples", "2", "--seqlen", "16")
    assert stats.exists() and not stale.exists()


# ---- 10. configs checked against bounds and against the tensors ----

def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    if "rope_theta" in changes and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = changes["rope_theta"]  # newer transformers write it here too
    (ckpt / "config.json").write_text(json.dumps(cfg))


def limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("changes,words", [
    ({"num_hidden_layers": 1000000000}, ["num_hidden_layers", "1000000000"]),
    ({"num_hidden_layers": 3}, ["num_hidden_layers is 3", "layers 0..1"]),
    ({"num_hidden_layers": 1}, ["num_hidden_layers is 1", "layers 0..1"]),
    ({"vocab_size": 4000000}, ["vocab_size is 4000000", "32000 rows"]),
    ({"vocab_size": 1 << 40}, ["vocab_size", str(1 << 40)]),
    ({"hidden_size": 128, "head_dim": 16}, ["hidden_size is 128", "64 columns"]),
    ({"intermediate_size": 1 << 40}, ["intermediate_size"]),
    ({"rms_norm_eps": -1.0}, ["norm_eps (rms_norm_eps)", "-1"]),
    ({"rms_norm_eps": 0}, ["norm_eps (rms_norm_eps)"]),
    ({"rope_theta": -10000.0}, ["rope.theta (rope_theta)"]),
    ({"eos_token_id": 99999999}, ["eos_token_id", "99999999"]),
    ({"max_position_embeddings": 1 << 40}, ["max_position_embeddings"]),
])
def test_absurd_or_mismatched_config_is_refused_by_every_reader(ckpt, tmp_path, changes, words):
    edit_config(ckpt, **changes)
    run = lambda *a: subprocess.run([str(Path(os.environ.get("KILN_BIN", Path(__file__).resolve().parents[2] / "build" /
                                                             "tools" / "kiln"))), *map(str, a)],
                                    capture_output=True, text=True, timeout=300, preexec_fn=limited_memory)
    refused(run("convert", ckpt, "-o", tmp_path / "ws"), *words)
    refused(run("inspect", ckpt), *words)
    refused(run("generate", ckpt, "--prompt", "Hi", "-n", "1"), *words)
    assert not (tmp_path / "ws").exists()


def test_duplicate_tensor_name_in_a_safetensors_header_is_an_error(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].decode().rstrip()
    entries = json.loads(header)
    dup = "model.norm.weight"
    # The same key twice with the same description: a JSON reader that keeps the last one sees a valid file.
    text = header[:-1] + ',"%s":%s}' % (dup, json.dumps(entries[dup]))
    text += " " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + n:])
    refused(run_kiln("convert", ckpt, "-o", tmp_path / "ws", check=False), "model.norm.weight", "twice")
    refused(run_kiln("inspect", ckpt, check=False), "twice")


# ---- Smaller: non-regular input files ----

def test_fifo_in_place_of_a_weight_file_is_refused_not_waited_on(ckpt, ws, tmp_path):
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    refused(run_kiln("generate", ckpt, "--prompt", "Hi", "-n", "1", check=False, timeout=120), "model.safetensors",
            "regular file")
    shard = ws / "weights-00001-of-00001.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    refused(run_kiln("generate", ws, "--prompt", "Hi", "-n", "1", check=False, timeout=120), "regular file")
    fifo = tmp_path / "tokens.fifo"
    os.mkfifo(fifo)
    refused(run_kiln("convert", ckpt, "-o", tmp_path / "x", check=False, timeout=120), "regular file")
    refused(run_kiln("tokenize", ws, "--file", fifo, check=False, timeout=120), "FIFO")


# ---- Smaller: numeric flags are range-checked at parse time ----

@pytest.mark.parametrize("args", [
    ("quantize", "WS", "-o", "OUT", "--eval-text", "T", "--max-ppl-increase", "-0.5"),
    ("quantize", "WS", "-o", "OUT", "--eval-text", "T", "--max-ppl-increase", "nan"),
    ("quantize", "WS", "-o", "OUT", "--group-size", "0"),
    ("quantize", "WS", "-o", "OUT", "--eval-ctx", "1"),
    ("quantize", "WS", "-o", "OUT", "--shard-size-mb", "0"),
    ("quantize", "WS", "-o", "OUT", "--threads", "-1"),
    ("quantize", "WS", "-o", "OUT", "--samples", "0"),
    ("convert", "HF", "-o", "OUT", "--shard-size-mb", "0"),
    ("convert", "HF", "-o", "OUT", "--shard-size-mb", "99999999999999"),
    ("export", "WS", "--format", "autoawq", "-o", "OUT", "--shard-size-mb", "-4"),
    ("generate", "WS", "--prompt", "x", "--top-p", "0"),
    ("generate", "WS", "--prompt", "x", "--top-p", "1.5"),
    ("generate", "WS", "--prompt", "x", "--temperature", "-1"),
    ("generate", "WS", "--prompt", "x", "--temperature", "inf"),
    ("generate", "WS", "--prompt", "x", "--min-p", "2"),
    ("generate", "WS", "--prompt", "x", "--presence-penalty", "3"),
    ("generate", "WS", "--prompt", "x", "--repetition-penalty", "0"),
    ("generate", "WS", "--prompt", "x", "--top-k", "-2"),
    ("generate", "WS", "--prompt", "x", "-n", "0"),
    ("generate", "WS", "--prompt", "x", "--ctx", "-5"),
    ("generate", "WS", "--prompt", "x", "--batch", "0"),
    ("generate", "WS", "--prompt", "x", "--prefill-chunk", "0"),
    ("chat", "WS", "--ctx", "-1"),
    ("chat", "WS", "--frequency-penalty", "-2.5"),
    ("eval", "WS", "--text", "T", "--ctx", "1"),
    ("eval", "WS", "--text", "T", "--max-tokens", "-1"),
    ("calibrate", "WS", "--data", "D", "--samples", "0"),
    ("calibrate", "WS", "--data", "D", "--seqlen", "-3"),
    ("calibrate", "WS", "--data", "D", "--batch-tokens", "0"),
])
def test_out_of_range_flag_is_a_usage_error(args):
    r = run_kiln(*args, check=False)
    assert r.returncode == 2, f"{args}: exit {r.returncode}\n{r.stderr}"
    flag = args[-2]  # each case ends with the flag under test and its bad value
    flag = "--max-new-tokens" if flag == "-n" else flag
    assert flag in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_zero_ppl_bound_is_accepted_as_a_bound(ws, tmp_path):
    """0 is a valid bound (no increase allowed); it must reach the gate, not be dropped like a negative was."""
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    r = run_kiln("quantize", ws, "-o", tmp_path / "q", "--method", "rtn", "--group-size", "32", "--eval-text", text,
                 "--eval-ctx", "32", "--max-ppl-increase", "0", "--json", check=False)
    doc = json.loads(r.stdout)
    assert doc["quality"]["max_ppl_increase"] == 0
    assert r.returncode == (3 if doc["quality"]["ppl_increase"] > 0 else 0)
