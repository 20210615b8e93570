"""kiln convert reading PyTorch .bin (torch.save zip) checkpoints, and refusing hostile ones without executing them.

Oracle: the workspace kiln converts from the safetensors of the same state dict. Weight files must be byte-identical.
The .bin files are written by torch.save itself, and sharded ones by huggingface_hub's save_torch_state_dict with
safe_serialization=False (transformers 5 no longer writes .bin; it still reads them, which the sharded test checks).
Hostile files are built with pickle opcodes by hand and zipped as torch.save does."""
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import transformers

from conftest import run_kiln

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_llama(dtype, tie=True, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norms away from 1 so that a swapped tensor would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def safetensors_reference(tmp_path, model):
    """The model saved as safetensors by transformers, converted by kiln: the oracle workspace."""
    src = tmp_path / "st"
    model.save_pretrained(src)
    (src / "generation_config.json").unlink(missing_ok=True)
    run_kiln("convert", src, "-o", tmp_path / "ws_st")
    return src, tmp_path / "ws_st"


def bin_dir(tmp_path, st_src, name="bin"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(st_src / "config.json", d / "config.json")
    return d


def weight_bytes(ws: Path):
    meta = json.loads((ws / "kiln.json").read_text())
    return meta, {f: (ws / f).read_bytes() for f in meta["weights"]["files"]}


def assert_same_workspace(ws_bin: Path, ws_st: Path):
    meta_b, files_b = weight_bytes(ws_bin)
    meta_s, files_s = weight_bytes(ws_st)
    assert meta_b["model"] == meta_s["model"] and meta_b["dtype"] == meta_s["dtype"]
    assert files_b.keys() == files_s.keys()
    for f in files_b:
        assert files_b[f] == files_s[f], f"{f} differs from the workspace converted from safetensors"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch_save_is_bit_exact_against_safetensors(tmp_path, dtype):
    model = tiny_llama(DTYPES[dtype], tie=True)
    st, ws_st = safetensors_reference(tmp_path, model)
    sd = model.state_dict()
    # Tied: lm_head and the embedding share one storage in the pickle.
    storage = lambda name: sd[name].untyped_storage().data_ptr()  # noqa: E731
    assert storage("lm_head.weight") == storage("model.embed_tokens.weight")
    d = bin_dir(tmp_path, st)
    torch.save(sd, d / "pytorch_model.bin")
    run_kiln("convert", d, "-o", tmp_path / "ws_bin")
    assert_same_workspace(tmp_path / "ws_bin", ws_st)
    meta = json.loads((tmp_path / "ws_bin" / "kiln.json").read_text())
    assert "pytorch_model.bin" in meta["provenance"]["source_files"]


def strided_state_dict(model):
    """The model's values, laid out as views: offsets into shared storages, transposes, gapped and broadcast strides."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out = {}
    for i in range(model.config.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        q, k, v = sd.pop(a + "q_proj.weight"), sd.pop(a + "k_proj.weight"), sd.pop(a + "v_proj.weight")
        fused = torch.cat([q, k, v])  # one storage; k and v start at an offset
        out[a + "q_proj.weight"] = fused[: q.shape[0]]
        out[a + "k_proj.weight"] = fused[q.shape[0] : q.shape[0] + k.shape[0]]
        out[a + "v_proj.weight"] = fused[q.shape[0] + k.shape[0] :]
        o = sd.pop(a + "o_proj.weight")
        out[a + "o_proj.weight"] = o.t().contiguous().t()  # column-major: transposed strides
        m = f"model.layers.{i}.mlp."
        g, u = sd.pop(m + "gate_proj.weight"), sd.pop(m + "up_proj.weight")
        inter = torch.stack([g, u], dim=-1)  # interleaved: every other element, an offset for up
        out[m + "gate_proj.weight"] = inter[..., 0]
        out[m + "up_proj.weight"] = inter[..., 1]
        down = sd.pop(m + "down_proj.weight")
        wide = torch.zeros(down.shape[0] + 3, down.shape[1] + 5, dtype=down.dtype)
        wide[2 : 2 + down.shape[0], 1 : 1 + down.shape[1]] = down
        out[m + "down_proj.weight"] = wide[2 : 2 + down.shape[0], 1 : 1 + down.shape[1]]  # offset, gapped rows
        n = f"model.layers.{i}.input_layernorm.weight"
        norm = sd.pop(n)
        if bool((norm == norm[0]).all()):
            out[n] = norm[:1].expand(norm.shape[0])
        else:
            out[n] = norm
    out.update(sd)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_views_shared_storages_and_strides_are_materialized_exactly(tmp_path, dtype):
    model = tiny_llama(DTYPES[dtype], tie=True)
    with torch.no_grad():  # one constant norm, saved as a stride-0 broadcast of one element
        model.model.layers[1].input_layernorm.weight.fill_(0.75)
    st, ws_st = safetensors_reference(tmp_path, model)
    sd = strided_state_dict(model)
    # The test exercises what it claims: offsets, non-contiguous strides and a broadcast.
    assert sd["model.layers.0.self_attn.k_proj.weight"].storage_offset() > 0
    assert not sd["model.layers.0.self_attn.o_proj.weight"].is_contiguous()
    assert not sd["model.layers.0.mlp.up_proj.weight"].is_contiguous()
    assert sd["model.layers.0.mlp.down_proj.weight"].storage_offset() > 0
    assert sd["model.layers.1.input_layernorm.weight"].stride() == (0,)
    d = bin_dir(tmp_path, st)
    torch.save(sd, d / "pytorch_model.bin")
    loaded = torch.load(d / "pytorch_model.bin", weights_only=True)
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    assert loaded[o_proj].stride() == sd[o_proj].stride()  # torch.save kept the transposed layout
    run_kiln("convert", d, "-o", tmp_path / "ws_bin")
    assert_same_workspace(tmp_path / "ws_bin", ws_st)


def test_sharded_bin_with_index(tmp_path):
    from huggingface_hub import save_torch_state_dict

    model = tiny_llama(torch.float16, tie=False)
    st, ws_st = safetensors_reference(tmp_path, model)
    d = bin_dir(tmp_path, st)
    save_torch_state_dict(model.state_dict(), d, safe_serialization=False, max_shard_size="8KB")
    shards = sorted(p.name for p in d.glob("pytorch_model-*.bin"))
    assert len(shards) > 2 and (d / "pytorch_model.bin.index.json").exists()
    # transformers reads this layout as a checkpoint of the same weights.
    again = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    run_kiln("convert", d, "-o", tmp_path / "ws_bin")
    assert_same_workspace(tmp_path / "ws_bin", ws_st)
    sources = json.loads((tmp_path / "ws_bin" / "kiln.json").read_text())["provenance"]["source_files"]
    assert "pytorch_model.bin.index.json" in sources and all(s in sources for s in shards)


def test_safetensors_preferred_when_both_present(tmp_path):
    model = tiny_llama(torch.float32)
    st, ws_st = safetensors_reference(tmp_path, model)
    (st / "pytorch_model.bin").write_bytes(b"not read")
    run_kiln("convert", st, "-o", tmp_path / "ws2")
    assert_same_workspace(tmp_path / "ws2", ws_st)


# --- hostile files ----------------------------------------------------------------------------------------------------


def torch_zip(path: Path, pkl: bytes, storages=None, compress=False):
    """A zip laid out like torch.save's: ARCHIVE/data.pkl, ARCHIVE/byteorder, ARCHIVE/version, ARCHIVE/data/KEY."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)


class _Storage:
    def __init__(self, key, numel, cls="FloatStorage"):
        self.key, self.numel, self.cls = key, numel, cls


class _Tensor:
    """Pickles exactly as torch.save pickles a tensor, with whatever (possibly hostile) geometry it is given."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def state_pickle(tensors: dict) -> bytes:
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda o: (("storage", getattr(torch, o.cls), o.key, "cpu", o.numel)
                                 if isinstance(o, _Storage) else None)
    p.dump(OrderedDict(tensors))
    return buf.getvalue()


def hostile_checkpoint(tmp_path, pkl: bytes, storages=None, compress=False):
    d = tmp_path / "hostile"
    d.mkdir()
    model = tiny_llama(torch.float32)
    model.config.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)
    torch_zip(d / "pytorch_model.bin", pkl, storages, compress)
    return d


def assert_refused(tmp_path, d, *needles):
    out = tmp_path / "ws_out"
    proc = run_kiln("convert", d, "-o", out, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pytorch_model.bin" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "ws_out" in p.name]  # no staging sibling left either
    return lines[0]


def test_baseline_hand_built_file_is_accepted(tmp_path):
    """The hostile variants below differ from this file only in the field they break; this one is valid."""
    st = tmp_path / "base"
    model = tiny_llama(torch.float32)
    model.save_pretrained(st)
    sd = model.state_dict()
    tensors, storages = {}, {}
    for i, (k, v) in enumerate(sd.items()):
        if k == "lm_head.weight":
            continue
        storages[str(i)] = v.contiguous().numpy().tobytes()
        tensors[k] = _Tensor(_Storage(str(i), v.numel()), 0, v.shape, v.stride())
    d = tmp_path / "hand"
    d.mkdir()
    shutil.copy(st / "config.json", d / "config.json")
    torch_zip(d / "pytorch_model.bin", state_pickle(tensors), storages)
    loaded = torch.load(d / "pytorch_model.bin", weights_only=True)  # torch reads the hand-built file
    assert torch.equal(loaded["model.norm.weight"], sd["model.norm.weight"])
    run_kiln("convert", st, "-o", tmp_path / "ws_st")
    run_kiln("convert", d, "-o", tmp_path / "ws_hand")
    assert_same_workspace(tmp_path / "ws_hand", tmp_path / "ws_st")


def test_os_system_reduce_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    def payload(target):
        cmd = f"touch {target}".encode()
        # GLOBAL os system; BINUNICODE cmd; TUPLE1; REDUCE; STOP
        return b"\x80\x02cos\nsystem\n" + b"X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."

    # The payload is live: Python's own unpickler runs it (on another marker, in a child process).
    live = tmp_path / "live"
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(bytes.fromhex(sys.argv[1]))",
                    payload(live).hex()], check=True)
    assert live.exists()

    d = hostile_checkpoint(tmp_path, payload(marker))
    line = assert_refused(tmp_path, d, "os.system")
    assert "nothing was executed" in line
    assert not marker.exists()


def test_stack_global_from_a_real_pickler_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    d = hostile_checkpoint(tmp_path, pickle.dumps({"w": Evil()}, protocol=4))  # STACK_GLOBAL, MEMOIZE, FRAME
    assert_refused(tmp_path, d, "posix.system")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("torch", "load"), ("torch.storage", "UntypedStorage"),
                                         ("collections", "defaultdict")])
def test_unknown_globals_are_refused(tmp_path, module, name):
    pkl = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)R."
    assert_refused(tmp_path, hostile_checkpoint(tmp_path, pkl), f"'{module}.{name}'")


def test_storage_out_of_bounds_is_refused(tmp_path):
    s = _Storage("0", 16)
    cases = {
        "size": _Tensor(s, 0, (17,), (1,)),
        "offset": _Tensor(s, 10, (4, 2), (2, 1)),
        "stride": _Tensor(s, 0, (4, 4), (1, 5)),
    }
    for case, t in cases.items():
        sub = tmp_path / case
        sub.mkdir()
        d = hostile_checkpoint(sub, state_pickle({"model.norm.weight": t}), {"0": bytes(64)})
        assert_refused(sub, d, "model.norm.weight", "storage '0'")


def test_storage_bigger_than_its_entry_is_refused(tmp_path):
    t = _Tensor(_Storage("0", 1 << 40), 0, (1 << 20, 1 << 20), (1 << 20, 1))
    d = hostile_checkpoint(tmp_path, state_pickle({"model.norm.weight": t}), {"0": bytes(64)})
    assert_refused(tmp_path, d, "storage '0'", "64 bytes")


def test_huge_declared_sizes_are_refused(tmp_path):
    for case, t in {"overflow": _Tensor(_Storage("0", 16), 0, (1 << 40, 1 << 40, 1 << 40), (0, 0, 0)),
                    "broadcast": _Tensor(_Storage("0", 16), 0, (1 << 30, 1 << 10), (0, 0))}.items():
        sub = tmp_path / case
        sub.mkdir()
        d = hostile_checkpoint(sub, state_pickle({"model.norm.weight": t}), {"0": bytes(64)})
        assert_refused(sub, d, "model.norm.weight")


def test_compressed_zip_bomb_is_refused(tmp_path):
    t = _Tensor(_Storage("0", 1 << 24), 0, (1 << 24,), (1,))
    d = hostile_checkpoint(tmp_path, state_pickle({"model.norm.weight": t}), {"0": bytes(1 << 26)}, compress=True)
    assert (d / "pytorch_model.bin").stat().st_size < 1 << 20  # 64 MiB of storage in well under 1 MiB
    assert_refused(tmp_path, d, "compressed")


def raw_zip(entries, overlap_second_into_first=False, zip64=False):
    """A stored zip written byte by byte, so that a central directory entry can point inside another entry's data, or
    defer its sizes and offset to zip64 extra fields as writers do for entries past 4 GiB."""
    out = bytearray()
    local = []
    for name, data in entries:
        n = name.encode()
        local.append(len(out))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, zipfile.crc32(data), len(data), len(data),
                           len(n), 0) + n + data
    if overlap_second_into_first:
        local[1] = local[0] + 30 + len(entries[0][0]) + 8  # the second header hides inside the first's data
    cd = bytearray()
    for (name, data), off in zip(entries, local):
        n = name.encode()
        extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), off) if zip64 else b""
        size32, off32 = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (len(data), off)
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, zipfile.crc32(data), size32,
                          size32, len(n), len(extra), 0, 0, 0, 0, off32) + n + extra
    start = len(out)
    out += cd
    count = len(entries)
    if zip64:
        z64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(cd), start)
        out += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        count, start = 0xFFFF, 0xFFFFFFFF
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(cd), start, 0)
    return bytes(out)


def test_zip64_directory_is_read(tmp_path):
    """Shards past 4 GiB defer sizes and offsets to zip64 fields; the same file laid out that way converts the same."""
    st = tmp_path / "st"
    model = tiny_llama(torch.float32)
    model.save_pretrained(st)
    d = bin_dir(tmp_path, st)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with zipfile.ZipFile(d / "pytorch_model.bin") as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    data = raw_zip(entries, zip64=True)
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # Python's reader agrees the zip64 layout is valid
        assert [(i.filename, z.read(i)) for i in z.infolist()] == entries
    (d / "pytorch_model.bin").write_bytes(data)
    run_kiln("convert", st, "-o", tmp_path / "ws_st")
    run_kiln("convert", d, "-o", tmp_path / "ws_bin")
    assert_same_workspace(tmp_path / "ws_bin", tmp_path / "ws_st")


def test_overlapping_zip_entries_are_refused(tmp_path):
    pkl = state_pickle({"model.norm.weight": _Tensor(_Storage("0", 2), 0, (2,), (1,))})
    inner_name = b"archive/data/0"
    inner = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 8, 8, len(inner_name), 0) + inner_name + bytes(8)
    first = ("archive/data.pkl", b"\x00" * 8 + inner + pkl)  # the second entry's header hides in these bytes
    good = raw_zip([("archive/data.pkl", pkl), ("archive/data/0", bytes(8))])
    assert zipfile.ZipFile(io.BytesIO(good)).read("archive/data/0") == bytes(8)  # the writer makes valid zips
    d = hostile_checkpoint(tmp_path, pkl)
    bomb = raw_zip([first, ("archive/data/0", bytes(8))], overlap_second_into_first=True)
    (d / "pytorch_model.bin").write_bytes(bomb)
    assert_refused(tmp_path, d, "overlap")


@pytest.mark.parametrize("bomb", ["nesting", "marks", "objects"])
def test_recursion_and_size_bombs_are_refused(tmp_path, bomb):
    if bomb == "nesting":  # a tuple nested 100000 deep
        pkl = b"\x80\x02N" + b"\x85" * 100000 + b"."
        needle = "deep"
    elif bomb == "marks":
        pkl = b"\x80\x02" + b"(" * 100000 + b"."
        needle = "MARK"
    else:  # a memoized list pushed millions of times
        pkl = b"\x80\x02]q\x00" + b"h\x00" * 3_000_000 + b"."
        needle = "more than"
    assert_refused(tmp_path, hostile_checkpoint(tmp_path, pkl), needle)


def test_self_containing_list_is_refused(tmp_path):
    pkl = b"\x80\x02]q\x00h\x00a."  # EMPTY_LIST, BINPUT 0, BINGET 0, APPEND: a list inside itself
    assert_refused(tmp_path, hostile_checkpoint(tmp_path, pkl), "inside itself")


def test_legacy_format_points_to_safetensors(tmp_path):
    model = tiny_llama(torch.float32)
    st = tmp_path / "st"
    model.save_pretrained(st)
    d = bin_dir(tmp_path, st)
    torch.save(model.state_dict(), d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_refused(tmp_path, d, "legacy", "safetensors")


def test_truncated_file_is_refused(tmp_path):
    model = tiny_llama(torch.float32)
    st = tmp_path / "st"
    model.save_pretrained(st)
    d = bin_dir(tmp_path, st)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, d)
