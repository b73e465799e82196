"""Local sources: every accepted layout, and every malformed file refused with a one-line message."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import llama_like, write_checkpoint
from weightdiff.errors import CheckpointFormatError, InputError, UnsupportedCheckpointError
from weightdiff.sources.local import LocalSource


def raw_file(path: Path, header: object | bytes, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def test_single_file_and_directory_forms(tmp_path):
    tensors = llama_like(layers=1)
    f = write_checkpoint(tmp_path / "a" / "model.safetensors", tensors)
    by_file = LocalSource(f)
    by_dir = LocalSource(tmp_path / "a")
    assert by_file.tensors().keys() == by_dir.tensors().keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(by_dir.read(by_dir.tensors()[name]), t)


def test_sharded_directory_with_index(tmp_path):
    tensors = llama_like(layers=2)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for shard, keys in shards.items():
        write_checkpoint(tmp_path / shard, {k: tensors[k] for k in keys})
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    src = LocalSource(tmp_path)
    assert set(src.tensors()) == set(tensors)
    for name in names:
        assert torch.equal(src.read(src.tensors()[name]), tensors[name])


def test_directory_of_files_without_index(tmp_path):
    tensors = llama_like(layers=1)
    keys = sorted(tensors)
    write_checkpoint(tmp_path / "part-a.safetensors", {k: tensors[k] for k in keys[:3]})
    write_checkpoint(tmp_path / "part-b.safetensors", {k: tensors[k] for k in keys[3:]})
    assert set(LocalSource(tmp_path).tensors()) == set(tensors)


def test_duplicate_tensor_across_files(tmp_path):
    t = {"w": torch.zeros(2)}
    write_checkpoint(tmp_path / "a.safetensors", t)
    write_checkpoint(tmp_path / "b.safetensors", t)
    with pytest.raises(CheckpointFormatError, match="'w' is also stored in"):
        LocalSource(tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"abc"), "not a safetensors file (only 3 bytes"),
        (lambda p: raw_file(p, b"{}", length=10**12), "absurdly large"),
        (lambda p: raw_file(p, b'{"a": 1}', length=500), "runs past the end of the"),
        (lambda p: raw_file(p, b"{not json!"), "header is not valid JSON"),
        (lambda p: raw_file(p, [1, 2]), "JSON is not an object"),
        (
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "truncated file: tensor 'w' ends at byte",
        ),
        (
            lambda p: raw_file(
                p,
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
                },
                b"\0" * 24,
            ),
            "tensors 'a' and 'b' overlap",
        ),
        (
            lambda p: raw_file(p, {"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype 'Q4_K'",
        ),
        (
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12),
            "has 12 bytes of data but its shape [4] and dtype F32 need 16",
        ),
        (
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
            "lacks dtype, shape or data_offsets",
        ),
        (
            lambda p: raw_file(p, {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2),
            "dtype F4, which weightdiff does not support",
        ),
    ],
)
def test_malformed_files(tmp_path, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises((CheckpointFormatError, UnsupportedCheckpointError)) as exc:
        LocalSource(path)
    assert message in str(exc.value)
    assert str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        LocalSource(tmp_path / "nope")


def test_empty_directory(tmp_path):
    with pytest.raises(InputError, match="no safetensors files in this directory"):
        LocalSource(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoints_are_refused_not_unpickled(tmp_path, name):
    # A file that would run code if unpickled: weightdiff must never open it as a pickle.
    (tmp_path / name).write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(UnsupportedCheckpointError, match="weightdiff never unpickles"):
        LocalSource(tmp_path)
    with pytest.raises(UnsupportedCheckpointError, match="is a pickle checkpoint"):
        LocalSource(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_index_shard_outside_directory(tmp_path, shard):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_checkpoint(tmp_path / "outside.safetensors", {"w": torch.zeros(2)})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointFormatError, match="lies outside the checkpoint directory"):
        LocalSource(ckpt)


def test_index_naming_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        InputError, match=r"names shard 'model-00001-of-00002.safetensors', which does not exist"
    ):
        LocalSource(tmp_path)


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    write_checkpoint(tmp_path / "b.safetensors", {"v": torch.zeros(2)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "b.safetensors", "v": "b.safetensors"}})
    )
    with pytest.raises(
        CheckpointFormatError, match=r"maps tensor 'w' to b.safetensors, which does not hold it"
    ):
        LocalSource(tmp_path)


def test_config_json_is_read_when_present(tmp_path):
    write_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert LocalSource(tmp_path).config() == {"tie_word_embeddings": True}


def test_index_shards_may_be_symlinks_like_the_hf_cache(tmp_path):
    # The Hugging Face cache keeps shards in blobs/ and links them from snapshots/<sha>/.
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    write_checkpoint(blobs / "1234", {"w": torch.ones(2)})
    (snap / "model-00001-of-00001.safetensors").symlink_to(blobs / "1234")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    src = LocalSource(snap)
    assert torch.equal(src.read(src.tensors()["w"]), torch.ones(2))
