"""The lazy reader validates safetensors headers as the format's own library does (unique keys, str → str
metadata, known dtypes, non-negative int shapes, offsets that tile the data buffer exactly), and shard
indexes may only name plain files inside the checkpoint folder. Every refusal is one line naming the file."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader, read_header
from mergekit_warp.io.source import INDEX, resolve_source

runner = CliRunner()


def craft(path: Path, header: dict | list | bytes, data: bytes = b"") -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, the header, then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(start: int, stop: int, shape: list | None = None) -> dict:
    return {"dtype": "F32", "shape": [(stop - start) // 4] if shape is None else shape, "data_offsets": [start, stop]}


def split(file: Path) -> tuple[dict, bytes]:
    """A real file's header (as a dict) and its data buffer."""
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def refused(file: Path, *needles: str) -> str:
    with pytest.raises(WarpError) as e:
        read_header(file)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{file}: ")
    assert "re-download or re-save it" in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


DEEP = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DUP = json.dumps({"a": f32(0, 4)}).encode()[:-1] + b', "a": ' + json.dumps(f32(0, 4)).encode() + b"}"

CASES = {
    # name: (header, data, words the message must hold)
    "full_overlap": ({"a": f32(0, 8), "b": f32(0, 8)}, bytes(8), ["tensor b overlaps tensor a"]),
    "partial_overlap": ({"a": f32(0, 8), "b": f32(4, 12)}, bytes(12), ["tensor b overlaps tensor a"]),
    "zero_size_inside_another": ({"a": f32(0, 8), "z": f32(4, 4, [0])}, bytes(8), ["tensor z overlaps"]),
    "hole_between": (
        {"a": f32(0, 4), "b": f32(8, 12)},
        bytes(12),
        ["hole of 4 unused data bytes between tensors a and b"],
    ),
    "hole_at_start": ({"a": f32(4, 8)}, bytes(8), ["hole of 4 unused data bytes before the first tensor a"]),
    "trailing_bytes": ({"a": f32(0, 4)}, bytes(8), ["4 unexpected bytes after the last tensor"]),
    "trailing_bytes_no_tensors": ({"__metadata__": {"format": "pt"}}, bytes(4), ["4 unexpected bytes"]),
    "data_too_short": ({"a": f32(0, 8)}, bytes(4), ["data ends at byte"]),
    "negative_dim": ({"a": f32(0, 4, [-1])}, bytes(4), ["tensor a", "shape [-1]"]),
    "negative_dims_cancel": ({"a": f32(0, 4, [-1, -1])}, bytes(4), ["tensor a", "shape"]),
    "bool_dim": ({"a": f32(0, 4, [True])}, bytes(4), ["tensor a", "shape"]),
    "float_dim": ({"a": f32(0, 4, [1.0])}, bytes(4), ["tensor a", "shape"]),
    "string_dim": ({"a": f32(0, 4, ["1"])}, bytes(4), ["tensor a", "shape"]),
    "shape_not_list": ({"a": f32(0, 4, 1)}, bytes(4), ["tensor a", "shape"]),
    "start_after_stop": ({"a": f32(8, 4, [1])}, bytes(8), ["tensor a", "start 8 after stop 4"]),
    "negative_offset": ({"a": f32(-4, 0, [1])}, b"", ["tensor a", "data_offsets"]),
    "three_offsets": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
        bytes(4),
        ["tensor a", "data_offsets"],
    ),
    "bool_offset": (
        {"a": {"dtype": "BOOL", "shape": [1], "data_offsets": [False, True]}},
        bytes(1),
        ["tensor a", "data_offsets"],
    ),
    "size_mismatch": ({"a": f32(0, 4, [2])}, bytes(4), ["tensor a", "4 bytes for shape [2]"]),
    "unknown_dtype": (
        {"a": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}},
        bytes(4),
        ["tensor a", "unknown dtype 'F7'"],
    ),
    "missing_dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), ["tensor a", "no dtype"]),
    "entry_not_object": ({"a": 3}, b"", ["tensor a", "not an object"]),
    "metadata_non_string": ({"__metadata__": {"format": 1}, "a": f32(0, 4)}, bytes(4), ["__metadata__"]),
    "metadata_nested": ({"__metadata__": {"format": {"x": "y"}}, "a": f32(0, 4)}, bytes(4), ["__metadata__"]),
    "metadata_list": ({"__metadata__": ["pt"], "a": f32(0, 4)}, bytes(4), ["__metadata__"]),
    "header_is_list": ([f32(0, 4)], bytes(4), ["not a JSON object"]),
    "deep_nesting": (DEEP, b"", ["nested too deeply"]),
    "duplicate_tensor": (DUP, bytes(4), ["repeats the key 'a'"]),
    "not_json": (b'{"a": ', b"", ["not JSON"]),
    "nan_constant": (b'{"__metadata__": {"x": NaN}}', b"", ["not JSON"]),
    "not_utf8": (b'{"\xff": 1}', b"", ["not UTF-8"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_header_refuses(tmp_path, case):
    header, data, needles = CASES[case]
    refused(craft(tmp_path / f"{case}.safetensors", header, data), *needles)


def test_refusals_reach_checkpoint_reader(tmp_path):
    f = craft(tmp_path / "x.safetensors", {"a": f32(0, 8), "b": f32(0, 8)}, bytes(8))
    with pytest.raises(WarpError, match=r"x\.safetensors: truncated or corrupt"):
        CheckpointReader(resolve_source(f))


def test_valid_files_pass(tmp_path, tiny_runs):
    # save_file, with a zero-size tensor, a scalar, several dtypes and metadata
    tensors = {
        "w": torch.randn(3, 5),
        "e": torch.zeros(0, 4),
        "s": torch.tensor(1.5, dtype=torch.bfloat16),
        "i": torch.arange(7),
        "b": torch.tensor([True, False, True]),
    }
    save_file(tensors, tmp_path / "st.safetensors", metadata={"format": "pt", "note": "x"})
    infos = read_header(tmp_path / "st.safetensors")
    assert {k: i.shape for k, i in infos.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    with CheckpointReader(resolve_source(tmp_path / "st.safetensors")) as r:
        assert all(torch.equal(r.read(k).reshape(v.shape), v) for k, v in tensors.items())
    # headers with nothing in them: allowed by the format (CheckpointReader refuses them elsewhere)
    assert read_header(craft(tmp_path / "empty.safetensors", {})) == {}
    assert read_header(craft(tmp_path / "meta.safetensors", {"__metadata__": {"format": "pt"}})) == {}
    assert read_header(craft(tmp_path / "null.safetensors", {"__metadata__": None, "a": f32(0, 4)}, bytes(4)))
    # zero-size tensors next to others, out of order in the header
    assert read_header(
        craft(tmp_path / "z.safetensors", {"b": f32(4, 8), "z": f32(4, 4, [0]), "a": f32(0, 4)}, bytes(8))
    )
    # save_pretrained, sharded
    sharded = make_tiny_llama(tmp_path / "sharded", max_shard_size="20KB")
    src = resolve_source(sharded)
    assert len(src.files) > 1 and (sharded / INDEX).exists()
    with CheckpointReader(src) as r:
        assert r.names
    # the package's own writer
    out = tmp_path / "lerp"
    r = runner.invoke(app, ["merge", "lerp", str(tiny_runs[0]), str(tiny_runs[1]), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    for f in resolve_source(out).files:
        assert read_header(f).keys() == load_file(f).keys()
    out2 = tmp_path / "lerp_sharded"
    r = runner.invoke(
        app, ["merge", "lerp", str(tiny_runs[0]), str(tiny_runs[1]), "-o", str(out2), "-q", "--max-shard-size", "20KB"]
    )
    assert r.exit_code == 0, r.output
    files = resolve_source(out2).files
    assert len(files) > 1 and all(read_header(f) for f in files)


# --- shard indexes ---------------------------------------------------------------------------


def sharded_copy(tmp_path: Path, name: str = "ckpt") -> Path:
    folder = tmp_path / "a" / "b" / name
    make_tiny_llama(folder, max_shard_size="20KB")
    return folder


def point_index(folder: Path, target: object, weight_map: object = None) -> Path:
    index = folder / INDEX
    data = json.loads(index.read_text())
    if weight_map is None:
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = target
    else:
        data["weight_map"] = weight_map
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize(
    "target",
    [
        "../../x.safetensors",
        "/etc/hostname",
        "sub/x.safetensors",
        "..",
        ".",
        "",
        "sub\\x.safetensors",
        "C:x.safetensors",
        "a\0b.safetensors",
    ],
)
def test_index_escape_refused(tmp_path, target):
    folder = sharded_copy(tmp_path)
    shard = min(folder.glob("model-*.safetensors"))
    # the files it points at exist and are valid: the refusal is about the name, not a missing file
    (folder / "sub").mkdir()
    shutil.copy(shard, folder / "sub" / "x.safetensors")
    shutil.copy(shard, tmp_path / "a" / "x.safetensors")
    index = point_index(folder, target)
    with pytest.raises(WarpError) as e:
        resolve_source(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{index}: ") and repr(target) in msg
    assert "outside the checkpoint folder" in msg


@pytest.mark.parametrize("weight_map", [["model-00001-of-00002.safetensors"], {"w": 3}, {"w": None}, "x"])
def test_index_weight_map_types(tmp_path, weight_map):
    folder = sharded_copy(tmp_path)
    index = point_index(folder, None, weight_map)
    with pytest.raises(WarpError) as e:
        resolve_source(folder)
    assert str(e.value).startswith(f"{index}: unreadable shard index") and "\n" not in str(e.value)


def test_index_deep_nesting(tmp_path):
    folder = sharded_copy(tmp_path)
    (folder / INDEX).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(WarpError, match="unreadable shard index"):
        resolve_source(folder)


def test_index_through_symlinks_is_fine(tmp_path):
    """HF cache snapshots: every file is a symlink into ../../blobs; plain names, so they are read."""
    src = sharded_copy(tmp_path, "src")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / f.name)
    source = resolve_source(snap)
    assert len(source.files) > 1 and all(f.is_symlink() for f in source.files)
    with CheckpointReader(source) as r:
        assert r.names


# --- the real CLI --------------------------------------------------------------------------------


def assert_cli_refused(args: list, out: Path, *needles: str) -> str:
    r = runner.invoke(app, ["merge", "slerp", *map(str, args), "-o", str(out)])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = getattr(r, "stderr", r.output)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return lines[0]


def rewrite(folder: Path, edit) -> Path:
    """Rewrite `folder`'s model.safetensors with `edit(header)` as the header (a dict, or raw bytes)."""
    f = folder / "model.safetensors"
    header, data = split(f)
    craft(f, edit(header), data)
    return f


def _order(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def overlap(header: dict) -> dict:
    """Point a later tensor at the bytes of an earlier one of the same size (it would silently copy it)."""
    names = _order(header)
    size = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in names}
    a = next(k for k in names if any(size[j] == size[k] for j in names if j != k))
    b = next(j for j in names[names.index(a) + 1 :] if size[j] == size[a])
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return header


def negative_dim(header: dict) -> dict:
    k = _order(header)[0]
    header[k]["shape"] = [-1] + header[k]["shape"][1:]
    return header


def deep(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return raw[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    "edit,needle", [(overlap, "overlaps"), (negative_dim, "shape [-1"), (deep, "nested too deeply")]
)
def test_cli_refuses_corrupt_header(tmp_path, tiny_init, tiny_runs, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_runs[1], bad)
    f = rewrite(bad, edit)
    out = tmp_path / "out"
    assert_cli_refused([tiny_runs[0], bad, "--init", tiny_init], out, str(f), needle, "re-download or re-save it")


def test_cli_refuses_index_escape(tmp_path, tiny_init, tiny_runs):
    folder = sharded_copy(tmp_path, "run")
    shard = min(folder.glob("model-*.safetensors"))
    shutil.copy(shard, tmp_path / "a" / "x.safetensors")  # a valid file where the index points
    index = point_index(folder, "../../x.safetensors")
    out = tmp_path / "out"
    assert_cli_refused(
        [tiny_runs[0], folder, "--init", tiny_init],
        out,
        str(index),
        "'../../x.safetensors'",
        "outside the checkpoint folder",
    )
